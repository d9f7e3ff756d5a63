"""A Python client for the image-embedder: arrays or encoded images in, (N, D) float32 out.

    from image_embedder_client import EmbeddingClient

    client = EmbeddingClient("http://127.0.0.1:8080", "encoder", key_file="key_file.json")
    emb = client.embed(images)        # np.ndarray (N, D) float32, one row per image, in order
    small = client.embed(images, dtype="float16", dimensions=64)  # (N, 64) float16: the first 64
    client.describe()                 # the served model's settings (layer, pooling, embedding_dim, ...)

`images` is one array (C,H,W), a batch (N,C,H,W), or a list whose items are arrays, encoded
images (PNG/JPEG `bytes`) or paths (PNG/JPEG files, or `.npy` files holding (C,H,W) or (N,C,H,W)).
Large inputs go out `batch_size` images per request. Arrays travel as `.npy` (uint8 when an
integer array's values fit 0..255, else float32: float arrays keep their values exactly), encoded images as they are (multipart, one part
per image), and the answer comes back as `.npy` (`Accept: application/x-npy`).

Retried, because embedding is idempotent: dropped or reset connections and timeouts (by urllib3's
`Retry`), and 503 (busy), 507 (out of memory) and TorchServe 0.12's 500 "Worker died." (a batch lost
with a worker that was killed or scaled down, pytorch/serve#1101), with exponential backoff, each on a
new connection: TorchServe can still write a lost batch's late answer on the old one, where the
next request would read it as its own. It can even answer such a job twice with 200, so every request
carries a fresh `Client-Request-Id`, which the server echoes: an answer that echoes another id is that
late answer, so the connection is closed and the request sent again on a new one.

Tokens (TorchServe's token authorization, docs/auth.md): `token=` is sent as it is; `key_file=`
is read for the inference key and read again whenever the server refuses it (a restarted server or a
rotated key is picked up on its own). With `management_url=` as well, a key that has expired
(`token_expiration_min`) is renewed through TorchServe's token API with the file's API key, so a
local client keeps working however short the expiry.

HTTPS (docs/security.md#https): `verify=` follows requests' convention: True (default) checks the
server's certificate against the system's trust store (or the bundle `REQUESTS_CA_BUNDLE` /
`CURL_CA_BUNDLE` names, when set), a path trusts the CA bundle (PEM file or folder) it names, False
checks nothing. It is passed with every request, so those variables never override a path or False
(requests lets them override a Session's own `verify`).

gRPC: a `grpc://host:7070` url (`grpcs://` over TLS, with `verify` as above, less False) sends the
same requests through TorchServe's gRPC inference API (grpc_transport.py; needs grpcio), with the
same tokens and retries; cheaper for many small concurrent requests (docs/performance.md#rest-or-grpc).

Needs numpy and requests only (grpcio for grpc://): no torch, no TorchServe.
"""
from __future__ import annotations

import io
import json
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Optional, Sequence, Union

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .grpc_transport import HANDSHAKE_MARKERS, RETRIABLE_CODES, Failure, GrpcTransport, batch_runs, refusal

ImageInput = Union[np.ndarray, bytes, bytearray, str, os.PathLike]
# A batch lost with its worker (killed, or stopped by a scale-down): safe to send again.
LOST_WORKER_MESSAGES = ("Worker died", "Worker scaled down")
# TorchServe 0.12 answers a missing, wrong or expired key with 400 InvalidKeyException.
AUTH_MARKERS = ("InvalidKeyException", "Token Authorization failed", "Token Authentication failed")
NPY = "application/x-npy"
# What `dtype=` may ask (the server's output_options.OUTPUT_DTYPES; the last three need a calibrated archive)
OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary")
# Sent with a fresh value on every request and echoed by the server on its answer.
REQUEST_ID = "Client-Request-Id"
Verify = Union[bool, str]
# numpy parses a .npy header with ast.literal_eval, and building an AST is not thread-safe on CPython
# 3.11 (one shared recursion counter: a rare "SystemError: AST constructor recursion depth mismatch",
# python/cpython#106905). Every .npy read here (answers, input files) goes through this lock.
_NPY_HEADER_LOCK = threading.Lock()


class EmbeddingError(RuntimeError):
    """The server refused a request (bad input, wrong token) or stayed unavailable after all retries."""

    def __init__(self, message: str, status: Optional[int] = None, body: str = "") -> None:
        super().__init__(message)
        self.status, self.body = status, body


class TokenError(EmbeddingError):
    """The inference key was refused and no fresh one could be found or made."""


@dataclass
class _Keys:
    """What key_file.json holds: the inference key, its expiry, and the token API's key."""

    inference: str
    expires: Optional[float]  # seconds since the epoch; None: unknown
    api: Optional[str]


def read_key_file(path: str) -> _Keys:
    """Parse TorchServe's key_file.json (written to the server's working directory)."""
    try:
        with open(path) as f:
            data = json.load(f)
        key = data["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"cannot read the inference key from {path!r}: {exc}") from exc
    expires = None
    stamp = data["inference"].get("expiration time")
    if isinstance(stamp, str):
        try:  # Java's Instant.toString(): 2026-11-28T05:00:00.123456Z
            expires = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()
        except ValueError:
            pass
    api = (data.get("API") or {}).get("key") if isinstance(data.get("API"), dict) else None
    return _Keys(key, expires, api)


def check_verify(verify: Union[bool, str, os.PathLike]) -> Verify:
    """requests' `verify` value: True, False, or the path of a CA bundle, refused now when it is not there."""
    if isinstance(verify, bool):
        return verify
    if isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if not os.path.exists(path):
            raise FileNotFoundError(f"verify={path!r}: no such CA bundle; pass the PEM file (or folder) of the CA "
                                    "that signed the server's certificate, True for the system's trust store, "
                                    "or False to check nothing")
        return path
    raise TypeError(f"verify is a {type(verify).__name__}; expected True, False or the path of a CA bundle")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def wire_dtype(array: np.ndarray) -> np.ndarray:
    """uint8 for uint8 arrays and integer arrays whose values fit 0..255 (4x smaller than float32), else float32."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "biu" and array.size and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"image array has dtype {array.dtype}; expected numbers (uint8 or float)")
    return array.astype(np.float32, copy=False)


def _image_type(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return "application/octet-stream"


def _as_arrays(array: np.ndarray, where: str) -> list[np.ndarray]:
    if array.ndim == 3:
        return [array]
    if array.ndim == 4:
        return list(array)
    raise ValueError(f"{where} has shape {array.shape}; expected one image (C,H,W) or a batch (N,C,H,W)")


def load_npy(source: Union[str, os.PathLike, io.BytesIO], mmap_mode: Optional[str] = None) -> np.ndarray:
    """numpy's load without pickles, safe from any number of threads (see _NPY_HEADER_LOCK); with
    `mmap_mode`, only the header is read under the lock."""
    with _NPY_HEADER_LOCK:
        return np.load(source, mmap_mode=mmap_mode, allow_pickle=False)


def flatten_images(images: Any) -> list[Union[np.ndarray, bytes]]:
    """One entry per image, in order: (C,H,W) arrays and encoded image bytes."""
    if isinstance(images, np.ndarray):
        return _as_arrays(images, "images")
    if isinstance(images, (bytes, bytearray, str, os.PathLike)):
        images = [images]
    items: list[Union[np.ndarray, bytes]] = []
    for i, item in enumerate(images):
        where = f"images[{i}]"
        if isinstance(item, np.ndarray):
            items.extend(_as_arrays(item, where))
        elif isinstance(item, (bytes, bytearray)):
            items.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if path.lower().endswith(".npy"):
                items.extend(_as_arrays(load_npy(path), f"{where} ({path})"))
            else:
                with open(path, "rb") as f:
                    items.append(f.read())
        else:
            raise TypeError(f"{where} is a {type(item).__name__}; expected a numpy array, image bytes or a path")
    return items


def encode_batch(batch: Sequence[Union[np.ndarray, bytes]]) -> dict:
    """requests keyword arguments for one request: arrays of one shape as one (N,C,H,W) .npy body,
    anything else as multipart/form-data with one part per image (names i0, i1, ... in order)."""
    arrays = [b for b in batch if isinstance(b, np.ndarray)]
    if len(arrays) == len(batch) and len({(a.shape, a.dtype) for a in arrays}) == 1:
        return {"data": _npy(wire_dtype(np.stack(arrays))), "headers": {"Content-Type": NPY}}
    files = []
    for i, item in enumerate(batch):
        if isinstance(item, np.ndarray):
            files.append((f"i{i}", (f"i{i}.npy", _npy(wire_dtype(item)), NPY)))
        else:
            files.append((f"i{i}", (f"i{i}", item, _image_type(item))))
    return {"files": files, "headers": {}}


@dataclass(frozen=True)
class ClientOptions:
    """EmbeddingClient's parameters as one object, for callers that pass them along (the embed CLI);
    `EmbeddingClient.from_options(options)` builds the client. Same names and defaults as its constructor."""

    url: str
    model: str
    token: Optional[str] = None
    key_file: Optional[str] = None
    timeout: float = 120.0
    retries: int = 5
    batch_size: int = 16
    backoff: float = 0.5
    management_url: Optional[str] = None
    verify: Verify = True


class EmbeddingClient:
    """Embeds images through a running image-embedder on TorchServe; thread-safe."""

    @classmethod
    def from_options(cls, options: ClientOptions) -> "EmbeddingClient":
        return cls(**{f.name: getattr(options, f.name) for f in fields(options)})

    def __init__(self, url: str, model: str, token: Optional[str] = None, key_file: Optional[str] = None,
                 timeout: float = 120.0, retries: int = 5, batch_size: int = 16, backoff: float = 0.5,
                 management_url: Optional[str] = None, verify: Verify = True) -> None:
        """`url`: the inference address; `token`: the inference key, or `key_file`: TorchServe's
        key_file.json (re-read when the key is refused); `timeout`: seconds per request; `retries`:
        tries after a retriable failure; `management_url`: lets a key_file client renew an expired key;
        `verify`: True, a CA bundle path or False, for HTTPS (see the module docstring)."""
        self.verify = check_verify(verify)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.url, self.model = url.rstrip("/"), model
        self.endpoint = f"{self.url}/predictions/{model}"
        self._grpc: Optional[GrpcTransport] = None
        if self.url.startswith(("grpc://", "grpcs://")):
            scheme, target = self.url.split("://", 1)
            self._grpc = GrpcTransport(target, model, tls=scheme == "grpcs", verify=self.verify)
            self.endpoint = f"{self.url} (model {model})"
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r}: expected http://, https://, or grpc:// / grpcs:// (TorchServe's gRPC "
                             "inference port)")
        self.management_url = management_url.rstrip("/") if management_url else None
        self.timeout, self.retries, self.batch_size, self.backoff = timeout, retries, batch_size, backoff
        self.key_file = key_file
        self._keys: Optional[_Keys] = read_key_file(key_file) if key_file and not token else None
        self._token = token or (self._keys.inference if self._keys else None)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []  # every thread's, so close() closes them all
        self._sessions_lock = threading.Lock()  # not _lock: a key renewal sends a request while holding it
        self._expired_seen: Optional[float] = None  # an expiry already found with no newer key
        self.retried = 0  # requests sent again (after a lost worker, 503/507, a reset or a timeout)
        self.renewed = 0  # keys renewed through the token API

    # --- transport -------------------------------------------------------------------------------
    def _retry(self) -> Retry:
        """Connection errors, resets and read timeouts, for every method (embedding is idempotent). Statuses
        are retried by `_send`, on a new connection."""
        return Retry(total=self.retries, connect=self.retries, read=self.retries, status=0, other=0,
                     allowed_methods=None, status_forcelist=(), backoff_factor=self.backoff,
                     backoff_max=30.0, respect_retry_after_header=True, raise_on_status=False)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", HTTPAdapter(max_retries=self._retry()))
            session.mount("https://", HTTPAdapter(max_retries=self._retry()))
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _send(self, method: str, **kwargs: Any) -> requests.Response:
        """One logical request: the adapter's retries, then lost-worker retries and key refreshes."""
        headers = dict(kwargs.pop("headers", {}))
        attempt = refreshed = 0
        while True:
            token = self._current_token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            headers[REQUEST_ID] = uuid.uuid4().hex
            try:
                response = self._session().request(method, self.endpoint, headers=headers, timeout=self.timeout,
                                                   verify=self.verify, **kwargs)
            except requests.exceptions.SSLError as exc:
                raise EmbeddingError(f"{self.endpoint}: the TLS handshake failed with verify={self.verify!r}: {exc}. "
                                     "A server whose certificate comes from a private CA needs verify= the path of "
                                     "that CA's PEM file (docs/security.md#https)") from exc
            except requests.RequestException as exc:
                raise EmbeddingError(f"{self.endpoint} unreachable after {self.retries} retries: {exc}") from exc
            self._count_retries(len(getattr(getattr(response.raw, "retries", None), "history", ()) or ()))
            echoed = response.headers.get(REQUEST_ID)
            if echoed is not None and echoed != headers[REQUEST_ID]:
                # A late answer to an earlier request on this connection (a job TorchServe answered twice):
                # ours may follow it, but the connection can't be trusted; close it and send again.
                self._session().close()
                if attempt >= self.retries:
                    raise EmbeddingError(f"{self.endpoint}: the answer was for request {echoed}, not "
                                         f"{headers[REQUEST_ID]}, {attempt + 1} times: the connection stays out of step")
                attempt += 1
                self._count_retries(1)
                continue
            if response.status_code == 200:
                return response
            if self._is_auth_refusal(response) and refreshed < 2 and self._refresh(token):
                refreshed += 1  # a fresh key (bounded: a file for another server must not loop)
                continue
            if response.status_code >= 500:
                # TorchServe can still write a lost batch's late answer on this keep-alive connection,
                # where the next request would read it as its own: never reuse the connection.
                self._session().close()
            if (response.status_code in (503, 507) or self._lost_worker(response)) and attempt < self.retries:
                attempt += 1
                self._pause(attempt)
                continue
            raise self._error(response)

    def _send_grpc(self, inputs: dict[str, bytes]) -> bytes:
        """One logical request over gRPC, with the same retries and key refreshes as `_send`."""
        attempt = refreshed = 0
        while True:
            token = self._current_token()
            answer = self._grpc.call(inputs, token, self.timeout)
            if isinstance(answer, Failure):
                if any(m in answer.details for m in HANDSHAKE_MARKERS):
                    raise EmbeddingError(f"{self.endpoint}: the TLS handshake failed with verify={self.verify!r}: "
                                         f"{answer.details[:500]}. A server whose certificate comes from a private CA "
                                         "needs verify= the path of that CA's PEM file (docs/security.md#https)")
                if answer.code == "PERMISSION_DENIED" or any(m in answer.details for m in AUTH_MARKERS):
                    if refreshed < 2 and self._refresh(token):
                        refreshed += 1
                        continue
                    raise TokenError(f"gRPC {answer.code} from {self.endpoint}: token refused: {self._token_hint()}: "
                                     f"{answer.details[:1000]}", None, answer.details)
                retriable = answer.code in RETRIABLE_CODES or any(m in answer.details for m in LOST_WORKER_MESSAGES)
                if retriable and attempt < self.retries:
                    attempt += 1
                    self._pause(attempt)
                    continue
                raise EmbeddingError(f"gRPC {answer.code} from {self.endpoint} after {attempt} retries: "
                                     f"{answer.details[:1000]}", None, answer.details)
            refused = refusal(answer)
            if refused is None:
                return answer
            status, text = refused
            if status in (503, 507) and attempt < self.retries:
                attempt += 1
                self._pause(attempt)
                continue
            raise EmbeddingError(f"{status} from {self.endpoint}: {text[:1000]}", status, text)

    def _pause(self, attempt: int) -> None:
        """Before retry `attempt` (1, 2, ...): the backoff, doubling, with jitter."""
        self._count_retries(1)
        time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random()))

    def _count_retries(self, count: int) -> None:
        if count:
            with self._lock:
                self.retried += count

    @staticmethod
    def _lost_worker(response: requests.Response) -> bool:
        return response.status_code >= 500 and any(m in response.text for m in LOST_WORKER_MESSAGES)

    @staticmethod
    def _is_auth_refusal(response: requests.Response) -> bool:
        return response.status_code in (400, 401, 403) and any(m in response.text for m in AUTH_MARKERS)

    def _error(self, response: requests.Response) -> EmbeddingError:
        text = response.text[:1000]
        if self._is_auth_refusal(response):
            return TokenError(f"HTTP {response.status_code} from {self.endpoint}: token refused: {self._token_hint()}: "
                              f"{text}", response.status_code, text)
        return EmbeddingError(f"HTTP {response.status_code} from {self.endpoint}: {text}", response.status_code, text)

    def _token_hint(self) -> str:
        """What to do about a refused key, for the error."""
        if self.key_file:
            return (f"{self.key_file!r} holds no valid inference key; an expired key is renewed only with "
                    "management_url= (docs/auth.md)")
        if self._token:
            return "the token is wrong or has expired (token_expiration_min); get the current inference key"
        return "pass the inference key as token= or the server's key_file.json as key_file="

    # --- tokens ----------------------------------------------------------------------------------
    def _current_token(self) -> Optional[str]:
        """The key to send; a key_file whose key has expired is renewed first (when it can be)."""
        keys = self._keys
        if (keys is not None and keys.expires is not None and keys.expires <= time.time()
                and keys.expires != self._expired_seen):
            if not self._refresh(self._token):  # nothing newer: don't re-read the file on every request;
                self._expired_seen = keys.expires  # a refused request still looks again
        return self._token

    def _refresh(self, used: Optional[str]) -> bool:
        """After `used` was refused (or found expired): a newer key from key_file, else a renewed one.
        True when there is a different key to try. One thread renews; the others pick up its key."""
        if not self.key_file:
            return False
        with self._lock:
            if self._token != used:  # another thread already found a fresh key
                return True
            keys = read_key_file(self.key_file)
            if keys.inference != used and (keys.expires is None or keys.expires > time.time()):
                self._keys, self._token = keys, keys.inference
                return True
            if self.management_url and keys.api:
                self._renew(keys.api)
                self._keys = read_key_file(self.key_file)
                self._token = self._keys.inference
                self.renewed += 1
                return self._token != used
            self._keys = keys
            return False

    def _renew(self, api_key: str) -> None:
        """TorchServe 0.12's token API: a new inference key (and expiry), written to key_file.json."""
        url = f"{self.management_url}/token?type=inference"
        response = self._session().get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout,
                                       verify=self.verify)
        if response.status_code != 200:
            raise TokenError(f"renewing the inference key at {url} failed: HTTP {response.status_code} "
                             f"{response.text[:300]}", response.status_code, response.text)

    # --- API -------------------------------------------------------------------------------------
    def embed(self, images: Any, dtype: Optional[str] = None, dimensions: Optional[int] = None) -> np.ndarray:
        """(N, D) embeddings of `images` (see the module docstring), one row per image, in order.
        `dtype` ("float32", "float16"; "int8", "uint8", "binary" from an archive built with --calibration:
        binary is (N, ceil(k/8)) uint8, packed bits) and `dimensions` (the first k) ask the server for
        smaller vectors; None: the archive's own (float32 and every dimension unless built otherwise)."""
        items = flatten_images(images)
        if not items:
            raise ValueError("no images to embed")
        rows = [self.embed_batch(items[i: i + self.batch_size], dtype, dimensions)
                for i in range(0, len(items), self.batch_size)]
        return np.concatenate(rows) if len(rows) > 1 else rows[0]

    def embed_batch(self, batch: Sequence[Union[np.ndarray, bytes]], dtype: Optional[str] = None,
                    dimensions: Optional[int] = None) -> np.ndarray:
        """One request for `batch` (flattened images), whatever its size: (len(batch), D), in the dtype
        the server answers (the one asked for)."""
        options = {"Accept": NPY}
        if dtype is not None:
            options["Embedding-Dtype"] = str(dtype)
        if dimensions is not None:
            options["Embedding-Dimensions"] = str(dimensions)
        if self._grpc is not None:
            entries = {name.lower(): value.encode() for name, value in options.items()}
            parts = [self._npy_answer(self._send_grpc({**inputs, **entries}))
                     for inputs in batch_runs(batch, lambda a: _npy(wire_dtype(a)))]
            out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        else:
            request = encode_batch(batch)
            request["headers"].update(options)
            response = self._send("POST", **request)
            if response.headers.get("Content-Type", "").startswith(NPY):
                out = load_npy(io.BytesIO(response.content))
            else:
                out = np.asarray(response.json()["embeddings"], dtype="uint8" if dtype == "binary" else dtype or np.float32)
        if out.ndim != 2 or len(out) != len(batch):
            raise EmbeddingError(f"server answered shape {out.shape} for a batch of {len(batch)} images")
        if dtype is not None and out.dtype != np.dtype("uint8" if dtype == "binary" else dtype):
            raise EmbeddingError(f"asked for {dtype} embeddings, the server answered {out.dtype}: an older server?")
        return out

    def _npy_answer(self, answer: bytes) -> np.ndarray:
        if not answer.startswith(b"\x93NUMPY"):
            raise EmbeddingError(f"{self.endpoint} answered {answer[:200]!r}, not the .npy asked for: an older server?")
        return load_npy(io.BytesIO(answer))

    def describe(self) -> dict:
        """What the served model says about itself: class, layer, pooling, embedding_dim, input shape, ..."""
        if self._grpc is not None:
            return json.loads(self._send_grpc({"describe": b"true"}))
        return self._send("GET", headers={"describe": "True"}).json()

    def close(self) -> None:
        """Close the connections of every thread that used this client (each has its own session)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        if self._grpc is not None:
            self._grpc.close()
        self._local = threading.local()

    def __enter__(self) -> "EmbeddingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
