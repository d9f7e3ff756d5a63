"""image_embedder_client: inputs it takes, what it retries (against a scripted server), and a real
TorchServe: every input kind against image_embedder_testkit.reference, describe(), and a stream through a killed
worker and a scale-down with nothing lost and nothing wrong."""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from image_embedder_testkit.load_test import kill_worker, wait_for_replacement
from image_embedder_client import (ClientOptions, EmbeddingClient, EmbeddingError, TokenError, encode_batch,
                                  flatten_images, load_npy)
from image_embedder_testkit.example_server import private_example_server
from image_embedder_testkit.management import scale, workers
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.scripted import scripted_embeddings, scripted_reply

WORKER_DIED = b'{"code": 500, "type": "InternalServerException", "message": "Worker died."}'


def test_inputs_flatten_to_one_entry_per_image(tmp_path):
    batch = np.zeros((2, 3, 4, 4), np.float32)
    np.save(tmp_path / "b.npy", np.ones((3, 3, 4, 4), np.uint8))
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    items = flatten_images([batch, np.zeros((3, 5, 5)), str(tmp_path / "b.npy"), tmp_path / "a.png", b"\xff\xd8\xffx"])
    assert [getattr(i, "shape", None) for i in items] == [(3, 4, 4)] * 2 + [(3, 5, 5)] + [(3, 4, 4)] * 3 + [None] * 2
    assert items[-2].startswith(b"\x89PNG") and items[-1] == b"\xff\xd8\xffx"
    assert len(flatten_images(np.zeros((3, 8, 8)))) == 1
    with pytest.raises(ValueError, match=r"shape \(8, 8\).*\(C,H,W\)"):
        flatten_images(np.zeros((8, 8)))
    with pytest.raises(TypeError, match=r"images\[0\] is a int"):
        flatten_images([3])


def test_wire_format_uint8_when_exact_float32_otherwise():
    """Whole numbers in 0..255 go as uint8, floats as float32; mixed shapes go as multipart parts."""
    def body_array(kwargs):
        return np.load(io.BytesIO(kwargs["data"]), allow_pickle=False)

    ints = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # int64 0..23
    sent = body_array(encode_batch(list(ints)))
    assert sent.dtype == np.uint8 and (sent == ints).all()
    assert body_array(encode_batch([np.full((3, 2, 2), 300)])).dtype == np.float32
    assert body_array(encode_batch([np.zeros((3, 2, 2), np.float64)])).dtype == np.float32
    parts = encode_batch([np.zeros((3, 2, 2), np.uint8), np.zeros((3, 4, 4), np.uint8), b"\x89PNG\r\n\x1a\nx"])["files"]
    assert [(p[0], p[1][2]) for p in parts] == [("i0", "application/x-npy"), ("i1", "application/x-npy"),
                                                ("i2", "image/png")]


class Scripted(BaseHTTPRequestHandler):
    """Plays `answers` in order ("reset": drop the connection; "slow": answer after the client's
    timeout; (status, body)), then answers a (n, 2) .npy of 7s; records each request's size."""

    answers: list = []
    seen: list = []
    valid: Optional[str] = None  # the inference key it accepts (None: any); like TorchServe, 400 otherwise
    key_file: Optional[str] = None  # where GET /token writes a renewed key
    renewals = 0

    def do_GET(self):  # noqa: N802  (the token API: renews the inference key, rewrites key_file.json)
        assert self.path == "/token?type=inference" and self.headers["Authorization"] == "Bearer api-key"
        cls = type(self)
        cls.renewals += 1
        cls.valid = f"renewed-{cls.renewals}"
        write_keys(cls.key_file, cls.valid, time.time() + 3600)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = len(load_npy(io.BytesIO(body)))
        type(self).seen.append((self.headers.get("Authorization"), self.headers.get("Accept"), n))
        if type(self).valid and self.headers.get("Authorization") != f"Bearer {type(self).valid}":
            answer = (400, b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed."}')
        else:
            answer = type(self).answers.pop(0) if type(self).answers else None
        if answer == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            return
        if answer == "slow":
            Scripted.release.wait(10)  # held until the client has given up on it
        if answer not in (None, "slow"):
            scripted_reply(self, *answer)
            return
        scripted_embeddings(self, n)

    def log_message(self, *args):
        pass


def write_keys(path: str, key: str, expires: float) -> None:
    """A key_file.json as TorchServe 0.12 writes it."""
    stamp = datetime.fromtimestamp(expires, timezone.utc).isoformat().replace("+00:00", "Z")
    with open(path, "w") as f:
        json.dump({"management": {"key": "m", "expiration time": stamp},
                   "inference": {"key": key, "expiration time": stamp}, "API": {"key": "api-key"}}, f)


@pytest.fixture
def scripted():
    Scripted.answers, Scripted.seen, Scripted.release = [], [], threading.Event()
    Scripted.valid, Scripted.key_file, Scripted.renewals = None, None, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    Scripted.release.set()
    server.shutdown()
    server.server_close()


def test_retries_what_is_safe_and_nothing_else(scripted, tmp_path):
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k1"}}))
    client = EmbeddingClient(scripted, "m", key_file=str(tmp_path / "key_file.json"), retries=6, backoff=0.01,
                             timeout=1.0)
    Scripted.answers = [(503, b"busy"), (500, WORKER_DIED), "reset", (507, b"oom"), "slow"]
    got = client.embed(np.zeros((3, 3, 4, 4), np.uint8))
    np.testing.assert_array_equal(got, np.full((3, 2), 7, np.float32))
    assert Scripted.seen == [("Bearer k1", "application/x-npy", 3)] * 6  # the same batch, six times
    Scripted.answers = [(503, b"busy")] * 3
    with pytest.raises(EmbeddingError, match="HTTP 503"):  # out of retries: a clear error
        EmbeddingClient(scripted, "m", retries=2, backoff=0.01).embed(np.zeros((3, 4, 4)))
    Scripted.answers, Scripted.seen = [(500, b'{"code": 500, "message": "decoding failed"}')], []
    with pytest.raises(EmbeddingError, match="HTTP 500.*decoding failed"):  # a real server error: not retried
        client.embed(np.zeros((3, 4, 4)))
    assert len(Scripted.seen) == 1


def test_every_npy_the_client_reads_is_parsed_under_one_lock(scripted, tmp_path, monkeypatch):
    """numpy parses .npy headers with ast, which CPython 3.11 can't do from two threads at once
    (python/cpython#106905): the client's input files and answers both go through its lock."""
    import image_embedder_client.client as client_module

    class Recording:
        entered: list = []

        def __enter__(self):
            self.entered.append(threading.current_thread().name)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(client_module, "_NPY_HEADER_LOCK", Recording())
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 4), np.uint8))
    got = EmbeddingClient(scripted, "m").embed([str(tmp_path / "x.npy")])
    np.testing.assert_array_equal(got, np.full((2, 2), 7, np.float32))
    here = threading.current_thread().name
    assert Recording.entered.count(here) == 2, Recording.entered  # the input file, then the answer


def mean_twice(handler: BaseHTTPRequestHandler) -> bytes:
    """A stand-in server's embedding of each image in the request: its mean, twice (.npy)."""
    images = load_npy(io.BytesIO(handler.rfile.read(int(handler.headers["Content-Length"]))))
    return npy_bytes(np.repeat(images.reshape(len(images), -1).mean(1, keepdims=True), 2, 1).astype(np.float32))


class LateAnswer(BaseHTTPRequestHandler):
    """TorchServe 0.12 scaling a worker down mid-batch: `WorkerThread.shutdown` puts the batch back in the
    queue for another worker while the stopped worker's thread fails the same jobs with 500 "Worker
    died."; a job has no "answered" guard, so its real answer follows later on the same keep-alive
    connection. Here the first request gets that 500, and from then on its connection answers every
    request with the answer still owed (the previous request's). Other connections answer at once.
    An image's embedding is its mean, twice."""

    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe
    first = True
    connections = 0

    def setup(self):
        super().setup()
        type(self).connections += 1
        self.owed: Optional[bytes] = None  # this connection's late answer, when it has one

    def do_POST(self):  # noqa: N802
        answer = mean_twice(self)
        if type(self).first:
            type(self).first, self.owed = False, answer
            scripted_reply(self, 500, WORKER_DIED, "application/json")
        elif self.owed is not None:
            self.owed, answer = answer, self.owed
            scripted_reply(self, 200, answer, "application/x-npy")
        else:
            scripted_reply(self, 200, answer, "application/x-npy")

    def log_message(self, *args):
        pass


class TwiceAnswered(BaseHTTPRequestHandler):
    """TorchServe 0.12 scaling a worker down mid-batch can also answer a job twice with 200: the stopped
    worker's answer, then the re-queued job's, on the same keep-alive connection. Here the first
    connection answers its first request at once and again when its second request comes, before that
    one's own answer; each answer echoes the Client-Request-Id it was for. An image's embedding is its mean."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self):
        super().setup()
        type(self).connections += 1
        self.number, self.previous = type(self).connections, None

    def do_POST(self):  # noqa: N802
        answer = (mean_twice(self), self.headers["Client-Request-Id"])
        owed, self.previous = ([self.previous] if self.number == 1 and self.previous else []), answer
        for body, request_id in owed + [answer]:  # on the first connection's second request: the first's again
            scripted_reply(self, 200, body, "application/x-npy", {"Client-Request-Id": request_id})

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server_class", [LateAnswer, TwiceAnswered])
def test_an_answer_owed_to_an_earlier_request_is_never_read_as_the_next_ones(server_class):
    """LateAnswer: a 500, then the late answer on that connection; TwiceAnswered: a 200 answered again,
    echoing the earlier request's id. On the first connection, 20 would get 10's answer."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), server_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = EmbeddingClient(f"http://127.0.0.1:{server.server_port}", "m", retries=3, backoff=0.01)
        for value in (10, 20, 30):
            got = client.embed(np.full((2, 3, 4, 4), value, np.uint8))
            np.testing.assert_array_equal(got, np.full((2, 2), value, np.float32))
        assert client.retried == 1 and server_class.connections == 2  # sent again once, on a new connection
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_key_is_read_again_from_the_key_file(scripted, tmp_path):
    path = str(tmp_path / "key_file.json")
    write_keys(path, "k1", time.time() + 3600)
    Scripted.valid = "k1"
    client = EmbeddingClient(scripted, "m", key_file=path)
    client.embed(np.zeros((3, 2, 2)))
    Scripted.valid = "k2"  # rotated (or the server restarted): the file has the new key
    write_keys(path, "k2", time.time() + 3600)
    client.embed(np.zeros((3, 2, 2)))
    assert [auth for auth, _, _ in Scripted.seen] == ["Bearer k1", "Bearer k1", "Bearer k2"]
    Scripted.valid, Scripted.seen = "k3", []  # a key the file does not have, and no management_url
    with pytest.raises(TokenError, match="holds no valid inference key.*management_url"):
        client.embed(np.zeros((3, 2, 2)))
    assert len(Scripted.seen) == 1  # the file had nothing newer: not sent again


def test_an_expired_key_is_renewed_once_for_all_threads(scripted, tmp_path):
    """Eight threads find the key expired together: one renews it through the token API, all use it."""
    path = str(tmp_path / "key_file.json")
    write_keys(path, "old", time.time() - 1)
    Scripted.valid, Scripted.key_file = "old-and-expired", path
    client = EmbeddingClient(scripted, "m", key_file=path, management_url=scripted)
    barrier = threading.Barrier(8)

    def one(_: int) -> np.ndarray:
        barrier.wait()
        return client.embed(np.zeros((3, 2, 2)))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r.shape == (1, 2) for r in results)
    assert Scripted.renewals == 1 and client.renewed == 1
    assert {auth for auth, _, _ in Scripted.seen} == {"Bearer renewed-1"}  # the expired key was never sent


class ScriptedGrpc:
    """Stands in for the client's gRPC transport: answers `script` in order, recording each call's inputs."""

    def __init__(self, script: list) -> None:
        self.script, self.calls = list(script), []

    def call(self, inputs, token, timeout):
        self.calls.append(inputs)
        return self.script.pop(0)

    def close(self) -> None:
        pass


def test_grpc_retries_what_is_safe_and_nothing_else():
    """Over gRPC the same rule as over REST: no worker, a lost batch and out of memory are sent again
    (the last arrives as the handler's 507 in an OK answer); a bad request is the caller's error."""
    from image_embedder_client.grpc_transport import Failure

    image = np.zeros((3, 8, 8), np.uint8)
    client = EmbeddingClient("grpc://127.0.0.1:1", "m", token="k", backoff=0.001)
    client._grpc = ScriptedGrpc([Failure("UNAVAILABLE", "Model m has no worker to serve inference request"),
                                 Failure("INTERNAL", "Worker died."),
                                 b'{"code": 507, "type": "OutOfMemory", "message": "out of memory"}',
                                 npy_bytes(np.ones((1, 4), np.float32))])
    np.testing.assert_array_equal(client.embed(image, dimensions=4), np.ones((1, 4), np.float32))
    assert client.retried == 3
    sent = client._grpc.calls[0]
    assert sent["accept"] == b"application/x-npy" and sent["embedding-dimensions"] == b"4"
    np.testing.assert_array_equal(load_npy(io.BytesIO(sent["data"])), image[None])
    client._grpc = ScriptedGrpc([b'{"code": 400, "type": "InvalidShape", "message": "bad"}',
                                 Failure("INTERNAL", "Model not found: m")])
    with pytest.raises(EmbeddingError, match="400 from grpc://127.0.0.1:1 .*InvalidShape") as refused:
        client.embed(image)
    assert refused.value.status == 400
    with pytest.raises(EmbeddingError, match="gRPC INTERNAL .*Model not found"):
        client.embed(image)
    assert client.retried == 3 and not client._grpc.script


def test_large_inputs_go_in_batches_in_order(scripted):
    client = EmbeddingClient(scripted, "m", batch_size=4)
    assert client.embed(np.zeros((10, 3, 2, 2), np.uint8)).shape == (10, 2)
    assert [n for _, _, n in Scripted.seen] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        EmbeddingClient(scripted, "m", batch_size=0)


# --- a real TorchServe ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client_server(example_archive, tmp_path_factory):
    """A private server (this module scales and kills its workers), serving the example as `encoder`."""
    server = private_example_server(example_archive, str(tmp_path_factory.mktemp("client_store")))
    yield server
    server.cleanup()


def key_file(server) -> str:
    return os.path.join(server.workdir, "key_file.json")


def url_of(server, transport: str) -> str:
    """The server's inference address over REST, or over TorchServe's gRPC inference API."""
    return server.inference_url if transport == "rest" else f"grpc://127.0.0.1:{server.ports['grpc_inference_port']}"


@pytest.mark.server
@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_every_input_kind_matches_the_reference(client_server, example_model, tmp_path, transport):
    rng = np.random.default_rng(90)
    floats = rng.normal(size=(5, 3, 224, 224)).astype(np.float32)
    pixels = rng.integers(0, 256, (3, 224, 224, 3)).astype(np.uint8)  # HWC images, saved as PNG/JPEG
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", pixels[1].transpose(2, 0, 1))
    png = io.BytesIO()
    Image.fromarray(pixels[2]).save(png, "PNG")
    url = url_of(client_server, transport)
    client = EmbeddingClient(url, "encoder", key_file=key_file(client_server), batch_size=2)
    got = client.embed(floats)  # 3 requests of .npy float32
    assert got.dtype == np.float32 and got.shape == (5, 10)
    np.testing.assert_allclose(got, reference_embeddings(example_model, "conv1", floats), atol=1e-5)
    mixed = client.embed([str(tmp_path / "a.png"), tmp_path / "b.npy", png.getvalue(), floats[0]])
    chw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), np.float32)  # the example archive feeds pixel values as they are
    np.testing.assert_allclose(mixed[:3], reference_embeddings(example_model, "conv1", chw), atol=1e-4)
    np.testing.assert_allclose(mixed[3], got[0], atol=1e-5)
    described = client.describe()
    assert described["layer_name"] == "conv1" and described["embedding_dim"] == 10
    small = client.embed(floats[:3], dtype="float16", dimensions=4)
    assert small.dtype == np.float16 and small.shape == (3, 4)
    np.testing.assert_allclose(small, got[:3, :4], atol=1e-2)
    with pytest.raises(TokenError, match="token refused.*wrong or has expired"):
        EmbeddingClient(url, "encoder", token="wrong").embed(floats[0])
    with pytest.raises(EmbeddingError, match="400 from .*InvalidImage.*cannot be decoded") as refused:  # the caller's error: not retried
        client.embed([b"\x89PNG\r\n\x1a\ntruncated"])
    assert refused.value.status == 400 and client.retried == 0


@pytest.mark.server
def test_a_refused_key_is_read_again_over_grpc(client_server, tmp_path):
    """Over gRPC as over REST: a key the server refuses makes the client read key_file again."""
    with open(key_file(client_server)) as f:
        keys = json.load(f)
    stale = tmp_path / "key_file.json"
    stale.write_text(json.dumps({**keys, "inference": {**keys["inference"], "key": "stale"}}))
    client = EmbeddingClient(url_of(client_server, "grpc"), "encoder", key_file=str(stale))
    image = np.zeros((3, 32, 32), np.uint8)
    with pytest.raises(TokenError, match=f"gRPC PERMISSION_DENIED .*{stale}"):
        client.embed(image)
    stale.write_text(json.dumps(keys))  # the server's current key, as a restarted server writes it
    assert client.embed(image).shape == (1, 10)


@pytest.mark.server
@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_stream_through_a_killed_worker_and_a_scale_down(client_server, example_model, transport):
    """Four threads embed batches without pause while a worker is SIGKILLed and 2 workers are scaled
    down to 1, and for a while after: every batch answered, every row equal to the reference."""
    threads, distinct = 4, 6
    rng = np.random.default_rng(91)
    inputs = [[rng.normal(size=(2, 3, 224, 224)).astype(np.float32) for _ in range(distinct)]
              for _ in range(threads)]
    expected = [[reference_embeddings(example_model, "conv1", batch) for batch in row] for row in inputs]
    # a timeout well above any answer here (a batch of 2 takes tens of ms): a request TorchServe leaves
    # unanswered while stopping a worker (tests/test_load_and_faults.py) is sent again instead of hanging.
    # One that merely ran slow is sent again too (retries=8), so a short timeout costs no correctness.
    client = EmbeddingClient(url_of(client_server, transport), "encoder", key_file=key_file(client_server),
                             timeout=10, retries=8, backoff=0.2)
    answers: list = []  # (thread, input index, embeddings, monotonic time answered)
    errors: list = []
    done = threading.Semaphore(0)
    stop = threading.Event()

    def stream(t: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                answers.append((t, i % distinct, client.embed(inputs[t][i % distinct]), time.monotonic()))
            except Exception as exc:  # recorded, asserted below
                errors.append((t, i, repr(exc)))
            done.release()
            i += 1

    def wait_done(count: int) -> None:  # until `count` more batches have finished
        for _ in range(count):
            assert done.acquire(timeout=300), "the stream stalled"

    scale(client_server, "encoder", 2)
    pool = [threading.Thread(target=stream, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    try:
        wait_done(4)
        pid, _ = kill_worker(client_server, "encoder")
        wait_for_replacement(client_server, "encoder", pid)
        wait_done(4)
        scale_down_at = time.monotonic()
        scale(client_server, "encoder", 1, synchronous=False)  # polled: the stopped worker gone
        wait_done(8)
    finally:
        stop.set()
        for thread in pool:
            thread.join(timeout=600)
    assert not errors, errors
    assert sum(at > scale_down_at for *_, at in answers) >= 8
    for t, i, got, _ in answers:
        np.testing.assert_allclose(got, expected[t][i], atol=1e-5)
    assert len([w for w in workers(client_server, "encoder") if w.get("status") == "READY"]) == 1
    print(f"{len(answers)} batches answered, {client.retried} sent again")


def test_client_options_are_the_constructors_parameters():
    """ClientOptions carries EmbeddingClient's parameters under the same names with the same defaults."""
    params = list(inspect.signature(EmbeddingClient.__init__).parameters.values())[1:]
    options = dataclasses.fields(ClientOptions)
    assert [p.name for p in params] == [f.name for f in options]
    assert [p.default for p in params] == [inspect.Parameter.empty if f.default is dataclasses.MISSING
                                           else f.default for f in options]
    client = EmbeddingClient.from_options(ClientOptions("http://h:1/", "m", timeout=7.0, batch_size=3))
    assert (client.url, client.model, client.timeout, client.batch_size) == ("http://h:1", "m", 7.0, 3)
