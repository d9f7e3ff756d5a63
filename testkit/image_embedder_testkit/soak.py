"""Soak: drive a TorchServe with a mix of request kinds for a while and record every worker's memory.

    image-embedder soak --minutes 60 --csv out/soak.csv --plot out/soak.png        # the example, built here
    image-embedder soak --archive model_store/encoder.mar --mix npy4:1,jpeg:3 --minutes 30
    image-embedder soak --url http://127.0.0.1:8080 --management-url http://127.0.0.1:8081 \\
        --model encoder --key-file key_file.json --minutes 10

Clients send the kinds of the mix in turn, weighted: `npy4` (4 uint8 images as .npy), `jpeg` (one
640x480 photo), `garbage` (2 KB of random bytes, which must get 400). Every answer is checked for its
status. Every `--sample-s` seconds each worker's resident memory (RSS, from the pids TorchServe's
management API lists) is written to the CSV with the requests answered so far. The summary gives
each worker's RSS after warm-up and at the end, and its slope (MB per minute, least squares over the
samples after warm-up): flat memory is a slope near zero.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import requests

from .management import rss_mb


KINDS = ("npy4", "jpeg", "garbage")
SETTINGS = {"resize": 256, "center_crop": 224, "scale": 1 / 255}  # the example as a user serves photos


@dataclass
class Tally:
    """Answers so far, by kind and outcome; shared by the client threads."""

    counts: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, ok: bool) -> None:
        with self.lock:
            key = (kind, "ok" if ok else "wrong")
            self.counts[key] = self.counts.get(key, 0) + 1

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def wrong(self) -> int:
        with self.lock:
            return sum(v for (_, outcome), v in self.counts.items() if outcome == "wrong")


def parse_mix(text: str) -> list[str]:
    """`npy4:1,jpeg:1,garbage:1` -> the kinds in turn, each as often as its weight."""
    order = []
    for part in text.split(","):
        kind, _, weight = part.partition(":")
        if kind not in KINDS:
            raise SystemExit(f"soak: unknown kind {kind!r} in --mix; choose from {', '.join(KINDS)}")
        order += [kind] * int(weight or 1)
    return order


def bodies(seed: int = 0) -> dict[str, tuple[bytes, str, int]]:
    """Each kind's body, Content-Type and expected status."""
    from image_embedder_testkit.bodies import npy_bytes

    from .photos import jpegs

    rng = np.random.default_rng(seed)
    return {"npy4": (npy_bytes(rng.integers(0, 256, (4, 3, 224, 224), dtype=np.uint8)), "application/x-npy", 200),
            "jpeg": (jpegs(1, 640, 480, seed)[0], "image/jpeg", 200),
            "garbage": (rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "application/x-npy", 400)}


def client(url: str, headers: dict, order: list[str], payloads: dict, stop: threading.Event, tally: Tally,
           offset: int) -> None:
    session = requests.Session()
    session.verify = True
    for kind in itertools.islice(itertools.cycle(order), offset, None):
        if stop.is_set():
            return
        body, content_type, status = payloads[kind]
        try:
            r = session.post(url, data=body, headers={**headers, "Content-Type": content_type}, timeout=120)
            tally.add(kind, r.status_code == status)
        except requests.RequestException:
            tally.add(kind, False)


def worker_pids(management_url: str, model: str, headers: dict) -> list[int]:
    r = requests.get(f"{management_url}/models/{model}", headers=headers, timeout=30)
    r.raise_for_status()
    # a worker that is (re)starting is listed with pid -1: nothing to sample yet
    return [pid for pid in (int(w.get("pid") or -1) for w in r.json()[0].get("workers", [])) if pid > 0]


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    t, m = np.array(samples).T
    return float(np.polyfit(t / 60, m, 1)[0])


def soak(url: str, management_url: str, model: str, inference_headers: dict, management_headers: dict,
         args: argparse.Namespace) -> dict:
    """Run the mix for args.minutes; sample RSS; return the summary (and write the CSV)."""
    order, payloads = parse_mix(args.mix), bodies()
    stop, tally = threading.Event(), Tally()
    threads = [threading.Thread(target=client, daemon=True,
                                args=(f"{url}/predictions/{model}", inference_headers, order, payloads, stop, tally, i))
               for i in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    series: dict[int, list[tuple[float, float]]] = {}
    rows = []
    try:
        while (now := time.monotonic() - start) < args.minutes * 60:
            for pid in worker_pids(management_url, model, management_headers):
                mb = rss_mb(pid)
                if mb is not None:
                    series.setdefault(pid, []).append((now, mb))
                    rows.append((round(now, 1), pid, round(mb, 1), tally.total(), tally.wrong()))
            stop.wait(args.sample_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["seconds", "worker_pid", "rss_mb", "answered", "wrong"])
            writer.writerows(rows)
    warm = args.warmup_min * 60
    workers = {}
    for pid, samples in series.items():
        after = [s for s in samples if s[0] >= warm]
        workers[pid] = {"rss_after_warmup_mb": after[0][1] if after else None, "rss_end_mb": samples[-1][1],
                        "slope_mb_per_min": slope_mb_per_min(after)}
    elapsed = time.monotonic() - start
    return {"minutes": elapsed / 60, "answered": tally.total(), "wrong": tally.wrong(),
            "requests_per_s": tally.total() / elapsed, "counts": {f"{k}/{o}": v for (k, o), v in tally.counts.items()},
            "workers": workers, "rows": rows}


def plot(rows: list, path: str, title: str) -> None:
    """Memory over time per worker, and answers per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, rate) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for pid in dict.fromkeys(r[1] for r in rows):
        mine = [r for r in rows if r[1] == pid]
        mem.plot([r[0] / 60 for r in mine], [r[2] for r in mine], label=f"worker {pid}")
    mem.set_ylabel("RSS (MB)")
    mem.set_ylim(bottom=0)
    mem.legend(fontsize=8)
    mem.set_title(title)
    times = sorted({r[0]: r[3] for r in rows}.items())
    rate.plot([t / 60 for t, _ in times[1:]],
              [(b - a) / max(1e-9, tb - ta) for (ta, a), (tb, b) in zip(times, times[1:])])
    rate.set_ylabel("answers / s")
    rate.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_example(store: str, settings: Optional[dict] = None) -> str:
    """The example served with server-side resize/crop/scale (and `settings`), batching 8 / 10 ms,
    one worker per core."""
    from image_embedder_testkit.example_build import build_example as build

    return build(store, "encoder", {**SETTINGS, **(settings or {})},
                 {"batchSize": 8, "maxBatchDelay": 10, "responseTimeout": 120})


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", help="serve this .mar on a private TorchServe (default: build the example)")
    parser.add_argument("--url", help="an inference URL of a running TorchServe instead")
    parser.add_argument("--management-url", help="its management URL (with --url)")
    parser.add_argument("--model", default="encoder", help="model name (with --url)")
    parser.add_argument("--key-file", help="its key_file.json (with --url)")
    parser.add_argument("--mix", default="npy4:1,jpeg:1,garbage:1", help="kinds and weights (default: an even mix)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-min", type=float, default=2.0, help="minutes left out of the slope")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for a private TorchServe's workers (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--csv", help="write the samples here")
    parser.add_argument("--plot", help="write a PNG chart here (needs matplotlib)")
    parser.add_argument("--json", help="write the summary here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop TorchServe
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    server, store = None, None
    try:
        if args.url:
            if not (args.management_url and args.key_file):
                raise SystemExit("soak: --url needs --management-url and --key-file")
            with open(args.key_file) as f:
                keys = json.load(f)
            url, management_url = args.url.rstrip("/"), args.management_url.rstrip("/")
            inference = {"Authorization": f"Bearer {keys['inference']['key']}"}
            management = {"Authorization": f"Bearer {keys['management']['key']}"}
        else:
            from image_embedder_testkit.ts_server import TorchServe

            store = tempfile.mkdtemp(prefix="soak-store-")
            archive = shutil.copy(args.archive, store) if args.archive else build_example(store)
            name = os.path.basename(archive)[:-4]
            env = dict(item.split("=", 1) for item in args.server_env)
            server = TorchServe(store, f"{name}={name}.mar", env=env).start(timeout=300)
            server.wait_for_workers(name, timeout=300)
            args.model, url, management_url = name, server.inference_url, server.management_url
            inference, management = server.headers(), server.headers("management")
        result = soak(url, management_url, args.model, inference, management, args)
    finally:
        if server is not None:
            server.cleanup()
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    print(f"{result['answered']} answers in {result['minutes']:.1f} min ({result['requests_per_s']:.1f}/s), "
          f"{result['wrong']} wrong; load average {os.getloadavg()[0]:.2f}")
    for pid, w in result["workers"].items():
        print(f"  worker {pid}: RSS after warm-up {w['rss_after_warmup_mb']} MB, at the end {w['rss_end_mb']:.0f} MB, "
              f"slope {w['slope_mb_per_min']:+.2f} MB/min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "rows"}, f, indent=1)
    if args.plot:
        plot(result["rows"], args.plot, f"{args.mix}, {args.clients} clients")
        print(f"chart: {args.plot}")
    return 1 if result["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
