"""Embed a folder of images (PNG/JPEG) or .npy files, or one large .npy, through a running TorchServe.

    python scripts/embed.py photos/ --model encoder --out out/ --key-file key_file.json
    python scripts/embed.py images.npy --model encoder --out out/ --batch-size 32 --concurrency 4

Built on image_embedder_client.EmbeddingClient (docs/client.md): each batch is one request, several
in flight at once, with a progress bar in images/s; lost workers (500 "Worker died."), 503, 507,
dropped connections and timeouts are retried with backoff, and a refused key is re-read from
--key-file (renewed through --management-url when it has expired; docs/auth.md). Over HTTPS,
--ca-bundle names the CA that signed the server's certificate (docs/security.md#https). Every finished
batch is written to a checkpoint shard, so running the same command again after a crash or Ctrl-C
resumes where it stopped; running it again after it finished says so and sends nothing.
At the end: out/embeddings.npy (N, D) float32 and out/names.txt (one name per line, same order),
out/embeddings.parquet (columns name, embedding) with --format parquet (needs pyarrow), or a LanceDB
table with --format lance (lance_store; `image-embedder search` queries it).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from image_embedder_client import ClientOptions, EmbeddingClient, EmbeddingError, TokenError, load_npy
from image_embedder_client.client import OUTPUT_DTYPES
from image_embedder_tools import lance_store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHECKPOINT = "checkpoint"
DONE = "done.json"  # a finished run: what it embedded and what it wrote


class ClientError(RuntimeError):
    """A failure the user must act on (bad input, refused request, wrong token)."""


@dataclass(frozen=True)
class RunSettings:
    """One run of embed.py: what to embed, where to write, and how to talk to the server (`client`,
    whose `batch_size` is also the checkpoint's batch)."""

    inputs: Sequence[str]
    out: str
    client: ClientOptions
    concurrency: int = 4
    fmt: str = "npy"
    restart: bool = False
    max_batches: Optional[int] = None
    quiet: bool = False
    dtype: Optional[str] = None  # the answer's dtype and first k dimensions (None: the archive's)
    dimensions: Optional[int] = None

    @property
    def batch_size(self) -> int:
        return self.client.batch_size

    @property
    def output(self) -> tuple:
        """What the run asks of the vectors, as it identifies a plan (empty: the archive's own)."""
        return tuple(v for v in (("dtype", self.dtype), ("dimensions", self.dimensions)) if v[1] is not None)

    def connect(self) -> EmbeddingClient:
        """The client; with neither a token nor a key file, ./key_file.json when there is one."""
        options = self.client
        if not options.key_file and not options.token and os.path.exists("key_file.json"):
            options = replace(options, key_file="key_file.json")
        return EmbeddingClient.from_options(options)


@dataclass(frozen=True)
class Item:
    """One image to embed: a name for the output and how to read it."""

    name: str
    path: str
    row: Optional[int] = None  # a row of a (N, C, H, W) .npy; None: the whole file is one image

    def load(self) -> Union[bytes, np.ndarray]:
        """Encoded image bytes as they are, or the (C,H,W) array."""
        if self.path.lower().endswith(IMAGE_SUFFIXES):
            with open(self.path, "rb") as f:
                return f.read()
        array = load_npy(self.path, mmap_mode="r")
        return np.asarray(array[self.row] if self.row is not None else array)


def _npy_items(path: str, name: str) -> list[Item]:
    array = load_npy(path, mmap_mode="r")
    if array.ndim == 3:
        return [Item(name, path)]
    if array.ndim == 4:
        return [Item(f"{name}[{i}]", path, i) for i in range(array.shape[0])]
    raise ClientError(f"{path} has shape {array.shape}; expected one image (C,H,W) or a batch (N,C,H,W)")


def list_items(inputs: Sequence[str]) -> list[Item]:
    """Every image under the inputs, in a stable order: folders walked sorted, .npy batches row by row."""
    items: list[Item] = []
    for source in inputs:
        if os.path.isdir(source):
            for root, dirs, files in os.walk(source):
                dirs.sort()
                for file in sorted(files):
                    path = os.path.join(root, file)
                    name = os.path.relpath(path, source)
                    if file.lower().endswith(IMAGE_SUFFIXES):
                        items.append(Item(name, path))
                    elif file.lower().endswith(".npy"):
                        items.extend(_npy_items(path, name))
        elif os.path.isfile(source) and source.lower().endswith(".npy"):
            items.extend(_npy_items(source, os.path.basename(source)))
        elif os.path.isfile(source) and source.lower().endswith(IMAGE_SUFFIXES):
            items.append(Item(os.path.basename(source), source))
        else:
            raise ClientError(f"{source!r} is not a folder, a .npy file or a PNG/JPEG image")
    if not items:
        raise ClientError(f"no PNG, JPEG or .npy files found in {list(inputs)}")
    return items


def embed_batch(client: EmbeddingClient, batch: Sequence[Item], dtype: Optional[str] = None,
                dimensions: Optional[int] = None) -> np.ndarray:
    """One request for `batch`; a refusal names the files instead of the parts (i0, i1, ...)."""
    try:
        return client.embed_batch([item.load() for item in batch], dtype, dimensions)
    except EmbeddingError as exc:
        message = str(exc)
        for i, item in reversed(list(enumerate(batch))):  # "part 'i3'" -> the file's name
            message = message.replace(f"'i{i}'", f"'i{i}' ({item.name})")
        hint = " (check --token / --key-file; docs/auth.md)" if isinstance(exc, TokenError) else ""
        raise ClientError(f"batch starting at {batch[0].name!r}{hint}: {message}") from exc


def items_digest(items: Sequence[Item], *extra: object) -> str:
    """Identifies a plan: the items, each file's size and modification time (an edited file is new
    work), and `extra` (batch size, format)."""
    stats = {path: (st.st_size, st.st_mtime_ns) for path in {i.path for i in items} for st in [os.stat(path)]}
    listed = [(i.name, i.path, i.row, stats[i.path]) for i in items]
    return hashlib.sha256(json.dumps([list(extra), listed]).encode()).hexdigest()


def finished_run(out: str, digest: str) -> Optional[dict]:
    """The record of a finished run of these inputs into `out`, if its outputs are still there."""
    try:
        with open(os.path.join(out, DONE)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    if done.get("digest") == digest and all(os.path.exists(p) for p in done.get("outputs", [])):
        return done
    return None


class Checkpoint:
    """Finished batches as shard files under out/checkpoint, tied to one plan (items + batch size)."""

    def __init__(self, out: str, items: Sequence[Item], batch_size: int, restart: bool = False,
                 output: Sequence[object] = ()) -> None:
        self.folder = os.path.join(out, CHECKPOINT)
        digest = items_digest(items, batch_size, *output)
        plan_path = os.path.join(self.folder, "plan.json")
        if restart:
            shutil.rmtree(self.folder, ignore_errors=True)
            if os.path.exists(os.path.join(out, DONE)):
                os.remove(os.path.join(out, DONE))
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                if json.load(f).get("digest") != digest:
                    raise ClientError(
                        f"{self.folder} belongs to another run (different inputs, --batch-size, --dtype or "
                        "--dimensions); "
                        "use --restart to start over or another --out"
                    )
        else:
            os.makedirs(self.folder, exist_ok=True)
            with open(plan_path, "w") as f:
                json.dump({"digest": digest, "items": len(items), "batch_size": batch_size}, f)

    def path(self, index: int) -> str:
        return os.path.join(self.folder, f"batch-{index:07d}.npy")

    def done(self, index: int) -> bool:
        return os.path.exists(self.path(index))

    def save(self, index: int, embeddings: np.ndarray) -> None:
        """Write atomically: a run killed mid-write leaves no half shard."""
        tmp = self.path(index) + ".tmp"
        with open(tmp, "wb") as f:
            np.save(f, embeddings, allow_pickle=False)
        os.replace(tmp, self.path(index))

    def load(self, index: int) -> np.ndarray:
        return load_npy(self.path(index))


def batches(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def write_output(out: str, names: Sequence[str], embeddings: np.ndarray, fmt: str,
                 dtype: Optional[str] = None) -> list[str]:
    """embeddings.npy + names.txt, embeddings.parquet, or the LanceDB table; returns the paths written."""
    if fmt == "lance":
        return [lance_store.write(out, names, embeddings, dtype)]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(out, "embeddings.parquet")
        table = pa.table({"name": list(names), "embedding": list(embeddings)})
        pq.write_table(table, path)
        return [path]
    emb_path, names_path = os.path.join(out, "embeddings.npy"), os.path.join(out, "names.txt")
    np.save(emb_path, embeddings, allow_pickle=False)
    with open(names_path, "w", encoding="utf-8") as f:
        f.writelines(name.replace("\n", " ") + "\n" for name in names)
    return [emb_path, names_path]


def _progress(total: int, initial: int, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # still works without tqdm, just silently
        quiet = True
    if quiet:
        class _Silent:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Silent()
    return tqdm(total=total, initial=initial, unit="img", desc="embedding", dynamic_ncols=True)


def run(settings: RunSettings) -> dict:
    """Embed everything not yet checkpointed, then (once all batches are done) write the output.
    Inputs already embedded into `settings.out` (same files, same format) are not sent again."""
    if settings.fmt in ("parquet", "lance"):
        needs = "lancedb" if settings.fmt == "lance" else "pyarrow"
        try:
            importlib.import_module(needs)
        except ImportError as exc:
            raise ClientError(f"--format {settings.fmt} needs {needs} (pip install {needs}); or use --format npy") from exc
    if settings.fmt == "lance":
        try:
            lance_store.distance_for(settings.dtype)
        except lance_store.StoreError as exc:
            raise ClientError(str(exc)) from exc
    items = list_items(settings.inputs)
    os.makedirs(settings.out, exist_ok=True)
    digest = items_digest(items, settings.fmt, *settings.output)
    done = None if settings.restart else finished_run(settings.out, digest)
    if done is not None:
        return {"items": len(items), "resumed": len(items), "embedded": 0, "retries": 0, "complete": True,
                "already_complete": True, "outputs": done["outputs"], "dim": done["dim"]}
    checkpoint = Checkpoint(settings.out, items, settings.batch_size, settings.restart, settings.output)
    plan = batches(items, settings.batch_size)
    pending = [i for i in range(len(plan)) if not checkpoint.done(i)]
    resumed = sum(len(plan[i]) for i in range(len(plan)) if checkpoint.done(i))
    if settings.max_batches is not None:
        pending = pending[: settings.max_batches]
    client = settings.connect()
    bar = _progress(len(items), resumed, settings.quiet)
    try:
        sent = _send(client, plan, pending, checkpoint, bar, settings)
    finally:
        bar.close()
        client.close()
    summary = {"items": len(items), "resumed": resumed, "embedded": sent, "retries": client.retried,
               "complete": all(checkpoint.done(i) for i in range(len(plan))), "outputs": []}
    if summary["complete"]:
        summary.update(_finish(settings, items, len(plan), checkpoint, digest))
    return summary


def _send(client: EmbeddingClient, plan: Sequence[Sequence[Item]], pending: Sequence[int], checkpoint: Checkpoint,
          bar: Any, settings: RunSettings) -> int:
    """Embed the `pending` batches of `plan`, `settings.concurrency` at once, each checkpointed as it
    arrives; returns how many images were sent."""
    concurrency = settings.concurrency
    sent = 0
    todo: Iterator[int] = iter(pending)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        running: dict[Future, int] = {}

        def submit_next() -> None:
            index = next(todo, None)
            if index is not None:
                running[pool.submit(embed_batch, client, plan[index], settings.dtype, settings.dimensions)] = index

        for _ in range(concurrency * 2):  # a bounded window: memory stays flat on big inputs
            submit_next()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                index = running.pop(future)
                checkpoint.save(index, future.result())
                sent += len(plan[index])
                bar.update(len(plan[index]))
                submit_next()
    return sent


def _finish(settings: RunSettings, items: Sequence[Item], batches_done: int, checkpoint: Checkpoint,
            digest: str) -> dict:
    """Write the output from every checkpointed batch, record the finished run, drop the checkpoint."""
    embeddings = np.concatenate([checkpoint.load(i) for i in range(batches_done)])
    try:
        outputs = write_output(settings.out, [i.name for i in items], embeddings, settings.fmt, settings.dtype)
    except lance_store.StoreError as exc:
        raise ClientError(str(exc)) from exc
    dim = int(embeddings.shape[1])
    with open(os.path.join(settings.out, DONE), "w") as f:
        json.dump({"digest": digest, "items": len(items), "dim": dim, "outputs": outputs, "format": settings.fmt,
                   "model": settings.client.model, "dtype": settings.dtype, "dimensions": settings.dimensions}, f)
    shutil.rmtree(checkpoint.folder, ignore_errors=True)
    return {"outputs": outputs, "dim": dim}


def add_server_arguments(parser: argparse.ArgumentParser, model_default: Optional[str] = "encoder") -> None:
    """The flags that say how to reach the server (embed and search share them)."""
    parser.add_argument("--url", default="http://127.0.0.1:8080",
                        help="TorchServe inference address: http(s)://, or grpc://host:7070 (its gRPC API)")
    parser.add_argument("--model", default=model_default, help="model name on the server")
    parser.add_argument("--token", help="inference token (default: from --key-file)")
    parser.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json if present)")
    parser.add_argument("--management-url", help="TorchServe management address: renews an expired key "
                        "from --key-file (docs/auth.md)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ca-bundle", metavar="PATH", help="HTTPS: the PEM file of the CA that signed the server's "
                     "certificate (default: the system's trust store; docs/security.md#https)")
    tls.add_argument("--insecure", action="store_true", help="HTTPS: check no certificate (testing only)")
    parser.add_argument("--retries", type=int, default=6, help="tries after a 503/507, a lost worker "
                        "(500 Worker died), a dropped connection or a timeout")
    parser.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")


def check_server_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A CA bundle that does not exist is a usage error."""
    if args.ca_bundle is not None and not os.path.exists(args.ca_bundle):
        parser.error(f"--ca-bundle {args.ca_bundle!r} does not exist: pass the PEM file of the CA that signed the "
                     "server's certificate (or leave it out to use the system's trust store)")


def client_options(args: argparse.Namespace, batch_size: int = 16, model: Optional[str] = None) -> ClientOptions:
    """The client the server flags describe."""
    return ClientOptions(args.url, model or args.model, token=args.token, key_file=args.key_file, timeout=args.timeout,
                         retries=args.retries, batch_size=batch_size, backoff=args.backoff,
                         management_url=args.management_url,
                         verify=False if args.insecure else (args.ca_bundle or True))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line, checked: sizes at least 1, a CA bundle that exists."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders of PNG/JPEG/.npy files, .npy files, or images")
    parser.add_argument("--out", required=True, help="output folder (also holds the checkpoint)")
    add_server_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--format", choices=("npy", "parquet", "lance"), default="npy",
                        help="lance: a LanceDB table in --out, for `image-embedder search`")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES,
                        help="the vectors' dtype (default: the archive's, float32 unless built otherwise; int8, "
                             "uint8 and binary need an archive built with --calibration)")
    parser.add_argument("--dimensions", type=int, help="keep the first K dimensions (default: the archive's)")
    parser.add_argument("--restart", action="store_true", help="drop an existing checkpoint or finished "
                        "output and embed everything again")
    parser.add_argument("--max-batches", type=int, help="stop after this many batches (resume later)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("batch_size", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    check_server_arguments(args, parser)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    client = client_options(args, args.batch_size)
    settings = RunSettings(args.inputs, args.out, client, concurrency=args.concurrency, fmt=args.format,
                           restart=args.restart, max_batches=args.max_batches, quiet=args.quiet,
                           dtype=args.dtype, dimensions=args.dimensions)
    try:
        summary = run(settings)
    except (ClientError, TokenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    if summary.get("already_complete"):
        print(f"already complete: {', '.join(summary['outputs'])} hold these {summary['items']} images; "
              "nothing sent (--restart to embed them again)", file=sys.stderr)
    elif not summary["complete"]:
        print("stopped early: run the same command again to resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
