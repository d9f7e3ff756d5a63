"""What a real TorchServe answers to requests that surprise users: repeated multipart part names,
bodies sent as application/x-www-form-urlencoded (curl's default), an HWC array, describe."""
from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

from image_embedder_testkit.bodies import npy_bytes

pytestmark = pytest.mark.server


def post(server, **kwargs):
    headers = server.headers(**kwargs.pop("headers", {}))
    return requests.post(f"{server.inference_url}/predictions/encoder", headers=headers, timeout=120, **kwargs)


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((224, 224, 3)) * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_repeated_part_names_are_refused_never_dropped(torchserve):
    a, b = png(1), png(2)
    same = post(torchserve, files=[("img", ("a.png", a, "image/png")), ("img", ("b.png", b, "image/png"))])
    assert same.status_code == 400, same.text[:300]
    assert same.json()["type"] == "RepeatedPartName" and "-F img0=@a.jpg" in same.json()["message"]
    distinct = post(torchserve, files=[("img0", ("a.png", a, "image/png")), ("img1", ("b.png", b, "image/png"))])
    assert distinct.status_code == 200 and np.asarray(distinct.json()["embeddings"]).shape == (2, 10)
    # a lone part with a long file name is not mistaken for a lost one
    long_name = post(torchserve, files=[("img", ("x" * 300 + ".png", a, "image/png"))])
    assert long_name.status_code == 200, long_name.text[:300]


def test_form_urlencoded_bodies(torchserve):
    """The handler answers 415 naming the fix whenever the request reaches it; bodies TorchServe's form
    decoder can't parse never do (its own 500), which docs/api.md says."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in (b'{"data": [[[0.5]]]}', npy_bytes(np.zeros((3, 224, 224), np.float32)), b"abc=1&def=2"):
        r = post(torchserve, data=body, headers=form)
        assert r.status_code == 415 and "-H 'Content-Type: application/json'" in r.json()["message"], r.text[:300]
    r = post(torchserve, data=b"%zz" + png(3), headers=form)
    assert r.status_code == 500 and r.json()["type"] == "ErrorDataDecoderException", r.text[:300]


def test_hwc_array_gets_the_hint(torchserve):
    r = post(torchserve, data=npy_bytes(np.zeros((224, 224, 3), np.float32)), headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 422 and "send (C,H,W)" in r.json()["message"], r.text[:300]


def test_answers_echo_the_request_id_through_torchserve(torchserve):
    """TorchServe hands the handler's Client-Request-Id back to the client: what EmbeddingClient checks."""
    body = npy_bytes(np.zeros((3, 224, 224), np.float32))
    r = post(torchserve, data=body, headers={"Content-Type": "application/x-npy", "Client-Request-Id": "3f2a9c"})
    assert r.status_code == 200 and r.headers.get("Client-Request-Id") == "3f2a9c", (r.status_code, dict(r.headers))
    refused = post(torchserve, data=b"garbage", headers={"Content-Type": "application/x-npy", "Client-Request-Id": "e41b"})
    assert refused.status_code == 400 and refused.headers.get("Client-Request-Id") == "e41b"
