"""Kubernetes exec probe for TorchServe with token authorization on (stdlib only, no torch import).

TorchServe 0.12 guards /ping with the inference key and the management API with the management key;
both are random per start and written to key_file.json in the server's working directory, so an
httpGet probe cannot carry them. This probe runs inside the container, reads the key file at every
run (a key refreshed through the management API is picked up), and sends no header when the file is
absent (token authorization off).

    probe.py live  --url http://127.0.0.1:8080 --key-file /home/model-server/key_file.json
        0 when the frontend answers /ping at all (any HTTP status: workers restarting is not a reason
        to kill the pod; TorchServe restarts them itself); 1 when it does not answer in time.
    probe.py ready --url http://127.0.0.1:8080 --management-url http://127.0.0.1:8081 --model encoder --key-file ...
        0 when /ping says Healthy and the model has at least one READY worker; 1 otherwise, saying why.

Over HTTPS (TorchServe's own TLS, docs/security.md#https), `--ca-bundle ca.pem` names the CA that
signed the server's certificate; without it the system's trust store is used.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from typing import Optional


def read_key(key_file: str, api: str) -> Optional[str]:
    """The `api` key ('inference' or 'management') from TorchServe's key_file.json, None without the file."""
    try:
        with open(key_file) as f:
            return json.load(f)[api]["key"]
    except FileNotFoundError:
        return None


def get(url: str, key: Optional[str], timeout: float, tls: Optional[ssl.SSLContext] = None) -> tuple[int, str]:
    """(status, body) of GET url; HTTP errors are answers too. `tls`: how an https URL is verified."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def one_line(body: str) -> str:
    """TorchServe's pretty-printed error body on one line (probe output lands in pod events)."""
    return " ".join(body.split())[:300]


def ready_workers(body: str) -> int:
    try:
        return sum(w.get("status") == "READY" for w in json.loads(body)[0].get("workers", []))
    except (ValueError, LookupError, AttributeError):
        return 0


def probe(args: argparse.Namespace) -> tuple[bool, str]:
    """(passed, why) for one probe run."""
    try:
        tls = ssl.create_default_context(cafile=args.ca_bundle) if args.ca_bundle else None  # SSLError: not a PEM
        status, body = get(args.url.rstrip("/") + "/ping", read_key(args.key_file, "inference"), args.timeout, tls)
        if args.kind == "live":
            return True, f"frontend answered /ping with {status}"
        if status != 200:
            return False, f"/ping answered {status}: {one_line(body)}"
        url = f"{args.management_url.rstrip('/')}/models/{args.model}"
        status, body = get(url, read_key(args.key_file, "management"), args.timeout, tls)
    except (OSError, ValueError, KeyError) as e:  # refused, timed out, unreadable key file
        return False, f"{args.kind}: {type(e).__name__}: {e}"
    if status != 200:
        return False, f"{url} answered {status}: {one_line(body)}"
    workers = ready_workers(body)
    return workers > 0, f"model {args.model}: {workers} READY worker(s)"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="TorchServe liveness/readiness probe with token auth")
    parser.add_argument("kind", choices=["live", "ready"])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference API")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081", help="management API (ready)")
    parser.add_argument("--model", default="encoder", help="the model that must have a READY worker (ready)")
    parser.add_argument("--key-file", default="key_file.json", help="TorchServe's key file (in its working dir)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP call")
    parser.add_argument("--ca-bundle", metavar="PATH", help="HTTPS: the PEM file of the CA that signed the "
                        "server's certificate (default: the system's trust store)")
    args = parser.parse_args(argv)
    if args.ca_bundle is not None and not os.path.isfile(args.ca_bundle):
        parser.error(f"--ca-bundle {args.ca_bundle!r} does not exist: pass the CA's PEM file")
    passed, why = probe(args)
    print(why, file=sys.stdout if passed else sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
