"""The `openai` SDK against a real TorchServe (token auth on): the README's example as written, both
encoding formats, embeddings equal to .npy requests and to the model through a forward hook, refusals
raised as the SDK's own errors, and a URL in `input` refused without the server connecting to it."""
import base64
import io
import socket
import threading

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings

pytestmark = pytest.mark.server
TIMEOUT = 120


def png_url(seed: int) -> tuple[str, np.ndarray]:
    hwc = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(hwc).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode(), np.ascontiguousarray(hwc.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def client(torchserve):
    key = torchserve.headers()["Authorization"].split(" ", 1)[1]
    return openai.OpenAI(base_url=f"{torchserve.inference_url}/predictions/encoder/1.0/v1", api_key=key,
                         max_retries=0, timeout=TIMEOUT)


def test_sdk_gets_the_embeddings_of_npy_requests(client, torchserve, example_model):
    (a_url, a), (b_url, b) = png_url(1), png_url(2)
    default = client.embeddings.create(model="encoder", input=[a_url, b_url])  # the SDK asks for base64, decodes
    as_floats = client.embeddings.create(model="encoder", input=[a_url, b_url], encoding_format="float")
    as_base64 = client.embeddings.create(model="encoder", input=[a_url, b_url], encoding_format="base64")
    got = np.asarray([d.embedding for d in default.data], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray([d.embedding for d in as_floats.data], dtype=np.float32), got)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in as_base64.data])
    np.testing.assert_array_equal(decoded, got)
    assert default.model == "encoder" and default.usage.total_tokens == 0 and [d.index for d in default.data] == [0, 1]

    r = requests.post(f"{torchserve.inference_url}/predictions/encoder", data=npy_bytes(np.stack([a, b])),
                      headers={**torchserve.headers(), "Content-Type": "application/x-npy", "Accept": "application/x-npy"},
                      timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), got)
    np.testing.assert_allclose(got, reference_embeddings(example_model, "conv1", np.stack([a, b])), atol=1e-4)


def test_the_same_body_on_the_plain_route(client, torchserve):
    url, _ = png_url(3)
    r = requests.post(f"{torchserve.inference_url}/predictions/encoder", json={"input": [url], "encoding_format": "float"},
                      headers=torchserve.headers(), timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["object"] == "list", r.text[:300]
    sdk = client.embeddings.create(model="encoder", input=[url], encoding_format="float")
    assert r.json()["data"][0]["embedding"] == sdk.data[0].embedding


def test_refusals_are_the_sdks_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="encoder", input=["a photo of a cat"])
    assert info.value.status_code == 400
    assert info.value.body["code"] == "InvalidBase64" and "not text" in info.value.body["message"]
    assert info.value.body["param"] == "input"


class Listener:
    """A TCP listener that counts the connections it is offered."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_url_in_input_is_refused_and_never_fetched(client, scheme):
    listener = Listener()
    try:
        url = f"{scheme}://127.0.0.1:{listener.port}/cat.png"
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model="encoder", input=[png_url(4)[0], url])
        assert info.value.body["code"] == "UrlNotFetched" and "fetches nothing" in info.value.body["message"]
    finally:
        listener.close()  # the answer came after the handler read every item: no fetch can still be pending
    assert listener.connections == 0



def test_models_lists_the_served_model(client):
    """TorchServe routes GET /predictions/<model>/<version>/v1/models to the handler as well."""
    assert [(m.id, m.object) for m in client.models.list()] == [("encoder", "model")]
