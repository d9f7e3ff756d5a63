"""The served suites, as data: which archives TorchServe serves and what clients send.

- layouts: how workers and threads share the cores (and the batch delay, how threads wait), for one
  client and for a crowd, against limits no layout beats (docs/performance.md#worker-layout);
- payloads: what a request's encoding costs (.npy, float32, JSON both ways, JPEG sizes) next to the
  no-op archives, i.e. TorchServe alone;
- fixed-cost: a tiny and a b32 request from one sequential client: TorchServe's transport, the batch
  delay, the model in process, and ours (what remains), with each worker default turned off in turn
  (docs/performance.md#the-fixed-cost-of-a-request);
- transport: the same requests over REST and over TorchServe's gRPC inference API.
"""
from __future__ import annotations

from .framework import (DEFAULT_DELAY_MS, NOOPS, PASSIVE, SERIAL_GC, SHIPPED, SPINNING, TRIM_64, Case, Serving,
                        server_key)
from .served import Suite

LAYOUTS = Suite("worker layouts, batch delays, thread waits; one client and a crowd", servings=(
    Serving(id="1xall", title="1 worker x every thread", workers=1, threads=0, delay_ms=20),
    Serving(id="Nx1", title="1 worker per core x 1 thread", threads=1, delay_ms=20),
    Serving(id="Nxshared-20ms", title="1 worker per core, shared threads, 20 ms batching", delay_ms=20),
    Serving(id="Nxshared", title=f"1 worker per core, shared threads, {DEFAULT_DELAY_MS} ms batching (default)"),
    Serving(id="Nxshared-2ms", title="shared threads, 2 ms batching", delay_ms=2, default=False),
    Serving(id="Nxshared-5ms", title="shared threads, 5 ms batching", delay_ms=5, default=False),
    Serving(id="Nxshared-spin", title="shared threads, libgomp's spin count", env=SPINNING, default=False),
    Serving(id="Nxshared-passive", title="shared threads, OMP_WAIT_POLICY=PASSIVE", env=PASSIVE, default=False),
    Serving(id="Nxshared-trim64", title="shared threads, glibc trims above 64 MiB", env=TRIM_64, default=False),
    Serving(id="Nxshared-serialgc", title="shared threads, the frontend on Java's serial GC", env=SERIAL_GC,
            default=False),
), cases=(
    Case(id="b32-seq", title="b32 uint8 .npy, 1 sequential client", payload="u8_32", per_client=3),
    Case(id="b32-x2", title="b32 uint8 .npy, 2 in flight", payload="u8_32", clients=2, limit="team"),
    # 16 requests a client: with 4, ResNet-18's rounds lasted under a second, mostly the first and last
    # batches (0.64-0.73 of the limit against 0.78 in rounds four times longer)
    Case(id="1img-x16", title="1 image uint8 .npy, 16 clients", payload="u8_1", clients=16, per_client=16,
         limit="team", limit_payload="u8_16"),
    Case(id="jpeg-seq", title="16 JPEG 1280x960 multipart, 1 client", payload="jpeg1280_16", limit="team",
         quick=False),
))

PAYLOADS = Suite("what a request's encoding costs, beside no-op archives", servings=(SHIPPED, *NOOPS), cases=(
    Case(id="u8_1-x16", title="16 clients, 1 img uint8 .npy", payload="u8_1", clients=16, limit="team",
         limit_payload="u8_16"),
    Case(id="u8_32", title="b32 uint8 .npy", payload="u8_32", per_client=4),
    Case(id="u8_32-x2", title="b32 uint8 .npy, 2 in flight", payload="u8_32", clients=2, limit="team"),
    Case(id="f32_32", title="b32 float32 .npy", payload="f32_32", limit_payload="u8_32", quick=False),
    Case(id="u8_32-json-answer", title="b32 uint8 .npy, JSON answer", payload="u8_32_json_answer",
         limit_payload="u8_32", quick=False),
    Case(id="json_u8_32", title="b32 uint8 as JSON", payload="json_u8_32", per_client=1, limit_payload="u8_32",
         quick=False),
    Case(id="jpeg640_16", title="16 JPEG 640x480 multipart", payload="jpeg640_16", limit="team"),
    Case(id="jpeg1080_16", title="16 JPEG 1920x1080 multipart", payload="jpeg1080_16", per_client=1, limit="team",
         models=("resnet18",), quick=False),
    Case(id="jpeg1080_1-x16", title="16 clients, 1 JPEG 1920x1080", payload="jpeg1080_1", clients=16, per_client=1,
         limit="team", limit_payload="jpeg1080_16", models=("resnet18",), quick=False),
))

FIXED_COST = Suite("a tiny and a b32 request: TorchServe, the batch delay, the model, ours", servings=(
    *NOOPS, SHIPPED,
    Serving(id="faulting", title="without reuse_freed_memory", settings={"reuse_freed_memory": False}, default=False),
    Serving(id="spinning", title="with libgomp's spin count", env=SPINNING, default=False),
    Serving(id="before", title="with neither", settings={"reuse_freed_memory": False}, env=SPINNING, default=False),
    Serving(id="passive", title="with OMP_WAIT_POLICY=PASSIVE instead", env=PASSIVE, default=False),
    Serving(id="ts-logs", title="on TorchServe's own log4j2.xml", launcher_logs=False, default=False),
    Serving(id="ts-logs-noop", title="no-op batched as ours, TorchServe's own log4j2.xml", launcher_logs=False,
            noop=True, default=False),
), cases=(
    Case(id="tiny", title="tiny (1x3x8x8 uint8 .npy)", payload="tiny", per_client=12, models=("example",)),
    Case(id="b32", title="b32 (32x3x224x224 uint8 .npy, 4.8 MB)", payload="u8_32", per_client=12,
         models=("example",)),
), idle_limit=True)

TRANSPORT = Suite("REST against TorchServe's gRPC inference API, same archives and payloads", servings=(
    SHIPPED, *NOOPS,
), cases=tuple(
    Case(id=f"{case}-{transport}", title=f"{title}, {transport}", transport=transport, **more)
    for case, title, more in (
        ("tiny", "tiny (1x3x8x8 uint8 .npy), 1 client", {"payload": "tiny", "per_client": 12}),
        ("b32", "b32 uint8 .npy, 1 client", {"payload": "u8_32", "per_client": 6}),
        ("1img-x16", "1 image uint8 .npy, 16 clients", {"payload": "u8_1", "clients": 16, "per_client": 4,
                                                        "limit": "team", "limit_payload": "u8_16"}),
    ) for transport in ("rest", "grpc")))

SERVED = {"layouts": LAYOUTS, "payloads": PAYLOADS, "fixed-cost": FIXED_COST, "transport": TRANSPORT}


def ours(results: dict) -> list[dict]:
    """Ours = our archive - the no-op batched as ours on the same server - the model in process (back to
    back / after idle), per serving and case, in ms per request (medians); with p90/median and
    model/served for each."""
    rows = results["rows"]
    limits = {(l["payload"], l["limit"]): l for l in results["limits"]}
    noop = {(r["layout"], r["case"]): r for r in rows if r["kind"] == "noop"}
    # a server's batched no-op (noop-batched on the launchers' environment, ts-logs-noop beside ts-logs);
    # a serving on a server without one is set against noop-batched
    key = {s.id: server_key(s) for s in FIXED_COST.servings}
    batched_noop = {key[s.id]: s.id for s in FIXED_COST.servings if s.noop and s.batch_size > 1}
    out = []
    for r in rows:
        baseline = noop.get((batched_noop.get(key.get(r["layout"]), "noop-batched"), r["case"]))
        if r["kind"] != "served" or baseline is None:
            continue
        name = r["limit_payload"]
        model, idle = limits[name, "single stream"], limits.get((name, "single stream after idle"))
        base = r["p50_ms"] - baseline["p50_ms"]
        out.append({"serving": r["layout"], "case": r["case"], "ours_ms": base - model["p50_ms"],
                    "ours_after_idle_ms": base - idle["p50_ms"] if idle else None,
                    "p90_over_median": r["p90_ms"] / r["p50_ms"], "model_over_served": model["p50_ms"] / r["p50_ms"]})
    print("\nours = archive - no-op batched - model (ms per request, median; after idle), p90/median, model/served:")
    for o in out:
        after = f" / {o['ours_after_idle_ms']:.1f}" if o["ours_after_idle_ms"] is not None else ""
        print(f"  {o['serving']:12} {o['case']:6} {o['ours_ms']:7.1f}{after}   {o['p90_over_median']:.2f}   "
              f"{o['model_over_served']:.2f}")
    return out
