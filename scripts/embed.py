#!/usr/bin/env python3
"""Embed a folder of images (PNG/JPEG) or .npy files, or one large .npy, through a running TorchServe.

    python scripts/embed.py photos/ --model encoder --out out/ --key-file key_file.json
    python scripts/embed.py images.npy --model encoder --out out/ --batch-size 32 --concurrency 4

Items are sent in batches (multipart/form-data, one part per image) by several threads at once,
with a progress bar in images/s. 503 (busy), 507 (out of memory) and 500 "Worker died" (a batch
lost with its worker, see pytorch/serve#1101) answers and dropped
connections are retried with exponential backoff. Every finished batch is written to a
checkpoint shard, so running the same command again after a crash or Ctrl-C resumes where it
stopped. At the end: out/embeddings.npy (N, D) float32 and out/names.txt (one name per line, same
order), or out/embeddings.parquet (columns name, embedding) with --format parquet (needs pyarrow).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import requests

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RETRY_STATUSES = (503, 507)
# TorchServe 0.12 kills a worker's in-flight batch when workers are scaled down or a worker dies
# (pytorch/serve#1101); embedding is idempotent, so those 500s are safe to send again.
RETRY_MESSAGES = ("Worker died", "Worker scaled down")
CHECKPOINT = "checkpoint"


class ClientError(RuntimeError):
    """A failure the user must act on (bad input, refused request, wrong token)."""


@dataclass(frozen=True)
class Item:
    """One image to embed: a name for the output and how to read it."""

    name: str
    path: str
    row: Optional[int] = None  # a row of a (N, C, H, W) .npy; None: the whole file is one image

    def payload(self) -> tuple[bytes, str]:
        """The part's bytes and content type: encoded image bytes as they are, arrays as .npy."""
        if self.path.lower().endswith(IMAGE_SUFFIXES):
            with open(self.path, "rb") as f:
                data = f.read()
            return data, "image/png" if self.path.lower().endswith(".png") else "image/jpeg"
        array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if self.row is not None:
            array = array[self.row]
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        return buf.getvalue(), "application/x-npy"


def _npy_items(path: str, name: str) -> list[Item]:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
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


def read_token(token: Optional[str], key_file: Optional[str]) -> Optional[str]:
    """The inference token: --token, else key_file.json's inference key, else none."""
    if token:
        return token
    path = key_file or ("key_file.json" if os.path.exists("key_file.json") else None)
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClientError(f"cannot read the inference key from {path!r}: {exc}") from exc


class Embedder:
    """Sends one batch of items and returns its (n, D) embeddings, retrying busy answers."""

    def __init__(self, url: str, model: str, token: Optional[str], retries: int = 6, backoff: float = 0.5,
                 timeout: float = 300.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.endpoint = f"{url.rstrip('/')}/predictions/{model}"
        self.headers = {"Accept": "application/x-npy"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.retries, self.backoff, self.timeout, self.sleep = retries, backoff, timeout, sleep
        self.retried = 0
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _wait(self, attempt: int, response: Optional[requests.Response]) -> None:
        delay = self.backoff * (2 ** attempt) * (0.5 + random.random())
        after = response.headers.get("Retry-After") if response is not None else None
        if after and after.isdigit():
            delay = max(delay, float(after))
        self.retried += 1
        self.sleep(delay)

    def embed(self, batch: Sequence[Item]) -> np.ndarray:
        files = []
        for i, item in enumerate(batch):
            data, content_type = item.payload()
            files.append((f"i{i}", (os.path.basename(item.path), data, content_type)))
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self._session().post(self.endpoint, files=files, headers=self.headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.retries:
                    raise ClientError(f"{self.endpoint} unreachable after {attempt + 1} tries: {exc}") from exc
                self._wait(attempt, None)
                continue
            if response.status_code == 200:
                return self._parse(response, len(batch))
            if self._retriable(response) and attempt < self.retries:
                self._wait(attempt, response)
                continue
            raise ClientError(self._explain(response, batch))
        raise AssertionError("unreachable")

    @staticmethod
    def _retriable(response: requests.Response) -> bool:
        """Busy or out of memory, or a batch lost with its worker: worth sending again."""
        if response.status_code in RETRY_STATUSES:
            return True
        return response.status_code == 500 and any(m in response.text for m in RETRY_MESSAGES)

    @staticmethod
    def _parse(response: requests.Response, count: int) -> np.ndarray:
        if response.headers.get("Content-Type", "").startswith("application/x-npy"):
            out = np.load(io.BytesIO(response.content), allow_pickle=False)
        else:
            out = np.asarray(response.json()["embeddings"], dtype=np.float32)
        if out.ndim != 2 or len(out) != count:
            raise ClientError(f"server answered shape {out.shape} for a batch of {count} images")
        return out.astype(np.float32, copy=False)

    @staticmethod
    def _explain(response: requests.Response, batch: Sequence[Item]) -> str:
        message = response.text[:500]
        for i, item in reversed(list(enumerate(batch))):  # "part 'i3'" -> the file's name
            message = message.replace(f"'i{i}'", f"'i{i}' ({item.name})")
        # TorchServe 0.12 answers a wrong token with 400 InvalidKeyException
        auth = response.status_code in (401, 403) or "InvalidKeyException" in message
        hint = " (the token was refused: check --token / --key-file)" if auth else ""
        return f"HTTP {response.status_code} for a batch starting at {batch[0].name!r}{hint}: {message}"


class Checkpoint:
    """Finished batches as shard files under out/checkpoint, tied to one plan (items + batch size)."""

    def __init__(self, out: str, items: Sequence[Item], batch_size: int, restart: bool = False) -> None:
        self.folder = os.path.join(out, CHECKPOINT)
        digest = hashlib.sha256(json.dumps([batch_size, [(i.name, i.path, i.row) for i in items]]).encode()).hexdigest()
        plan_path = os.path.join(self.folder, "plan.json")
        if restart:
            shutil.rmtree(self.folder, ignore_errors=True)
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                if json.load(f).get("digest") != digest:
                    raise ClientError(
                        f"{self.folder} belongs to another run (different inputs or --batch-size); "
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
        return np.load(self.path(index), allow_pickle=False)


def batches(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def write_output(out: str, names: Sequence[str], embeddings: np.ndarray, fmt: str) -> list[str]:
    """embeddings.npy + names.txt, or embeddings.parquet; returns the paths written."""
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


def run(inputs: Sequence[str], out: str, url: str, model: str, token: Optional[str] = None, batch_size: int = 16,
        concurrency: int = 4, fmt: str = "npy", retries: int = 6, backoff: float = 0.5, timeout: float = 300.0,
        restart: bool = False, max_batches: Optional[int] = None, quiet: bool = False) -> dict:
    """Embed everything not yet checkpointed, then (once all batches are done) write the output."""
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ClientError("--format parquet needs pyarrow (pip install pyarrow); or use --format npy") from exc
    items = list_items(inputs)
    os.makedirs(out, exist_ok=True)
    checkpoint = Checkpoint(out, items, batch_size, restart)
    plan = batches(items, batch_size)
    pending = [i for i in range(len(plan)) if not checkpoint.done(i)]
    resumed = sum(len(plan[i]) for i in range(len(plan)) if checkpoint.done(i))
    if max_batches is not None:
        pending = pending[:max_batches]
    embedder = Embedder(url, model, token, retries, backoff, timeout)
    bar = _progress(len(items), resumed, quiet)
    sent = 0
    todo: Iterator[int] = iter(pending)
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            running: dict[Future, int] = {}

            def submit_next() -> None:
                index = next(todo, None)
                if index is not None:
                    running[pool.submit(embedder.embed, plan[index])] = index

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
    finally:
        bar.close()
    summary = {"items": len(items), "resumed": resumed, "embedded": sent, "retries": embedder.retried,
               "complete": all(checkpoint.done(i) for i in range(len(plan))), "outputs": []}
    if summary["complete"]:
        embeddings = np.concatenate([checkpoint.load(i) for i in range(len(plan))])
        summary["outputs"] = write_output(out, [i.name for i in items], embeddings, fmt)
        summary["dim"] = int(embeddings.shape[1])
        shutil.rmtree(checkpoint.folder, ignore_errors=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders of PNG/JPEG/.npy files, .npy files, or images")
    parser.add_argument("--out", required=True, help="output folder (also holds the checkpoint)")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="TorchServe inference address")
    parser.add_argument("--model", default="encoder", help="model name on the server")
    parser.add_argument("--token", help="inference token (default: from --key-file)")
    parser.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json if present)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--format", choices=("npy", "parquet"), default="npy")
    parser.add_argument("--retries", type=int, default=6, help="tries after a 503/507, a lost worker (500 Worker died) or a dropped connection")
    parser.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--restart", action="store_true", help="drop an existing checkpoint and start over")
    parser.add_argument("--max-batches", type=int, help="stop after this many batches (resume later)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("batch_size", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        summary = run(args.inputs, args.out, args.url, args.model, read_token(args.token, args.key_file),
                      args.batch_size, args.concurrency, args.format, args.retries, args.backoff, args.timeout,
                      args.restart, args.max_batches, args.quiet)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    if not summary["complete"]:
        print("stopped early: run the same command again to resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
