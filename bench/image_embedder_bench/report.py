"""What the benchmark prints and returns: the table of rows with their ratios, the checks, the targets."""
from __future__ import annotations

import argparse
import os

import numpy as np

from image_embedder_bench.cases import OWN_WORK_CEILING, TARGETS
from image_embedder_bench.measure import Measurement

Rows = dict[tuple[str, str], Measurement]  # (model, row id) -> row


def ratios(m: Measurement, by_key: Rows) -> dict[str, float]:
    """This row's images/s over each referenced row's, keyed by the referenced row's name."""
    out = {}
    for ref in m.refs:
        other = by_key.get((m.model, ref))
        if other is not None:
            out[other.name] = m.rate() / other.rate()
    return out


def table_row(m: Measurement, by_key: Rows) -> dict:
    lat = m.latencies_ms()
    rates = m.rates()
    served = m.kind in ("served", "floor")
    return {"model": m.model, "kind": m.kind, "id": m.id, "name": m.name, "images_per_s": m.rate(),
            "spread": [min(rates), max(rates)], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "ratios": ratios(m, by_key),
            "client_cpu_ms_per_image": m.cpu_ms_per_image("client_cpu_s") if served else None,
            "server_cpu_ms_per_image": m.cpu_ms_per_image("server_cpu_s") if served else None,
            "errors": m.errors()}


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmachine: {os.cpu_count()} cores shared by client and server (and other users); torch threads "
          f"{args.threads} in process and per worker; {args.rounds} interleaved round(s): median, spread min-max")
    header = (f"{'model':9} {'kind':6} {'measurement':50} {'img/s':>8} {'spread':>13} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'cli/srv ms/img':>15}  ratios")
    print(header)
    print("-" * (len(header) + 30))
    for r in rows:
        spread = f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f}"
        cpu = (f"{r['client_cpu_ms_per_image']:.2f}/{r['server_cpu_ms_per_image']:.2f}"
               if r["client_cpu_ms_per_image"] is not None else "")
        ratio = "  ".join(f"{v:.2f}x {k}" for k, v in r["ratios"].items())
        errors = f"  ERRORS: {len(r['errors'])} e.g. {r['errors'][0]}" if r["errors"] else ""
        print(f"{r['model']:9} {r['kind']:6} {r['name']:50} {r['images_per_s']:8.1f} {spread:>13} {r['p50_ms']:8.1f} "
              f"{r['p99_ms']:8.1f} {cpu:>15}  {ratio}{errors}")
    print("ratios: this row's images/s over the named row's, same model, same run; cli/srv: CPU ms per image of "
          "the bench process (clients) and of TorchServe's process tree")


def print_checks(checks: dict, breakdowns: dict, extras: dict) -> None:
    print("\nserved answers vs in-process embedding of the same payload (max abs diff):")
    for key, diff in checks.items():
        print(f"  {key:60} {'no sample' if diff is None else f'{diff:.2e}'}")
    print("\nhandler's own work for one batch-32 uint8 .npy request (in process, best of repeats):")
    for model, parts in breakdowns.items():
        for k, v in parts.items():
            if k not in ("zero_copy_npy", "own_work_pct_of_forward"):
                print(f"  {model:9} {k:42} {v:9.2f} ms")
        print(f"  {model:9} own work (decode+prepare+.npy response) = {parts['own_work_pct_of_forward']:.2f}% of forward;"
              f" .npy decode zero-copy: {bool(parts['zero_copy_npy'])}")
    for model, cosines in extras["draft_cosine"].items():
        if cosines:
            print(f"  {model:9} JPEG 1920x1080, min embedding cosine vs exact decode: "
                  + ", ".join(f"{k} {v:.5f}" for k, v in cosines.items()))
    for o in extras["options"]:
        if "error" in o:
            print(f"  option {o['model']:9} {o['option']:16} not usable: {o['error'][:150]}")
        else:
            print(f"  option {o['model']:9} {o['option']:16} {o['images_per_s']:7.1f} img/s  first call "
                  f"{o['first_call_s']:6.1f}s  max abs {o['max_abs']:.2e}  min cosine {o['min_cosine']:.7f}")


def print_targets(by_key: Rows, breakdowns: dict) -> list[dict]:
    """Each target whose two rows ran, met or missed; a goal marked `ceiling` is a most."""
    out = []
    print("\ntargets:")
    for target in TARGETS:
        a, b = by_key.get((target.model, target.row)), by_key.get((target.model, target.ref))
        if a and b:
            out.append({"target": target.label, "id": target.id, "value": a.rate() / b.rate(), "goal": target.goal})
    if "resnet18" in breakdowns:
        out.append({"target": "resnet18 handler's own work, % of forward (at most)", "id": "resnet18_own_work",
                    "value": breakdowns["resnet18"]["own_work_pct_of_forward"], "goal": OWN_WORK_CEILING,
                    "ceiling": True})
    for t in out:
        t["met"] = t["value"] <= t["goal"] if t.get("ceiling") else t["value"] >= t["goal"]
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']:56} {t['value']:7.2f} (goal "
              f"{'<=' if t.get('ceiling') else '>='} {t['goal']})")
    return out


def report(measurements: list[Measurement], breakdowns: dict, checks: dict, extras: dict,
           args: argparse.Namespace) -> dict:
    """Print everything; return the results (rows, checks, targets, errors) for --json."""
    by_key = {m.key: m for m in measurements}
    rows = [table_row(m, by_key) for m in measurements]
    print_table(rows, args)
    print_checks(checks, breakdowns, extras)
    targets = print_targets(by_key, breakdowns)
    errors = [e for r in rows for e in r["errors"]]
    bad = {k: v for k, v in checks.items() if v is not None and v > 1e-3}
    if bad:
        errors.append(f"served embeddings differ from in-process ones: {bad}")
        print(f"\nERROR: {errors[-1]}")
    return {"rows": rows, "breakdown": breakdowns, "checks": checks, "targets": targets, "errors": errors,
            "threads": args.threads, "rounds": args.rounds, "cores": os.cpu_count(), **extras}
