"""Tokens over days of uptime (docs/auth.md).

TorchServe 0.12 (frontend util/TokenAuthorization.java) writes key_file.json at start with an
inference and a management key, each expiring `token_expiration_min` after it was made, and an API
key that never expires. An expired key is refused (400 InvalidKeyException); nothing renews it but
the token API (`GET :8081/token?type=inference` with the API key), which makes a new key and
rewrites key_file.json. The shipped config makes keys live as long as the server; a client that
follows docs/client.md (key_file + management_url) keeps working whatever the expiry.
"""
from __future__ import annotations

import os
import time
from datetime import datetime

import numpy as np
import pytest
import requests

from image_embedder_client import EmbeddingClient
from image_embedder_testkit.checkout import SHIPPED_CONFIG
from image_embedder_testkit.key_stream import key_file_data, post_with_key
from image_embedder_testkit.reference import reference_embeddings
from test_shipped_config import read_properties

YEAR_S = 365 * 24 * 3600
AUTH_REFUSED = "InvalidKeyException"


def expires(entry: dict) -> float:
    return datetime.fromisoformat(entry["expiration time"].replace("Z", "+00:00")).timestamp()


def test_shipped_config_sets_a_lifetime_expiry():
    assert float(read_properties(SHIPPED_CONFIG)["token_expiration_min"]) * 60 >= 5 * YEAR_S


@pytest.mark.server
def test_shipped_config_keys_outlive_a_year(torchserve):
    data = key_file_data(torchserve)
    for kind in ("inference", "management"):
        assert expires(data[kind]) > time.time() + YEAR_S, data[kind]


@pytest.mark.slow
@pytest.mark.server
def test_a_client_following_the_docs_outlives_one_minute_keys(key_stream, example_model):
    """135 s, across two expiries at least: the keys handed out at start stop working, TorchServe renews
    nothing by itself, and the documented client (key_file + management_url) never misses an answer.

    The stream (image_embedder_testkit.key_stream) starts before the suite's first test and runs beside
    it; this joins it."""
    key_stream.join()
    server, first, images = key_stream.server, key_stream.first_keys, key_stream.images
    expected = reference_embeddings(example_model, "conv1", images)
    assert not key_stream.failures, key_stream.failures
    minutes = {int(at // 60) for *_, at in key_stream.answers}
    assert {0, 1, 2} <= minutes, sorted(minutes)  # answered in every minute, and past the second expiry
    for i, got, _ in key_stream.answers:
        np.testing.assert_allclose(got, expected[i: i + 1], atol=1e-5)
    # One renewal per expiry, not one per thread: the start keys expire within the first 60 s (made
    # before the stream), each renewed key 60 s after its renewal: two expiries by ~122 s, three at most.
    assert 2 <= key_stream.client.renewed <= 3
    # what expired: both keys made at start; TorchServe refuses them and rewrote nothing by itself
    assert time.time() > expires(first["inference"]) and time.time() > expires(first["management"])
    stale = post_with_key(server, first["inference"]["key"], images[0])
    assert stale.status_code == 400 and AUTH_REFUSED in stale.text
    stale = requests.get(f"{server.management_url}/models", timeout=30,
                         headers={"Authorization": f"Bearer {first['management']['key']}"})
    assert stale.status_code == 400 and AUTH_REFUSED in stale.text
    now = key_stream.final_keys  # as the stream left it (a renewed key lives 60 s: this test may run later)
    assert now["inference"]["key"] != first["inference"]["key"]  # renewed through the token API
    assert now["management"] == first["management"]  # untouched by an inference renewal
    assert now["API"] == first["API"]  # the token API's key never expires
    fresh = key_stream.fresh  # a plain request with that key, sent when the stream ended
    assert fresh.status_code == 200, fresh.text
    np.testing.assert_allclose(np.asarray(fresh.json()["embeddings"], np.float32), expected[1:2], atol=1e-5)


@pytest.mark.server
def test_renewal_replaces_the_key_at_once_and_clients_follow(short_expiry_server, key_stream, example_model):
    """The token API invalidates the old key immediately; a key_file client picks up the new one.
    After the key stream has ended: a renewal here would count as one of its client's."""
    key_stream.join()
    server = short_expiry_server
    image = np.random.default_rng(71).normal(size=(3, 224, 224)).astype(np.float32)
    path = os.path.join(server.workdir, "key_file.json")
    client = EmbeddingClient(server.inference_url, "encoder", key_file=path, management_url=server.management_url)
    client.embed(image)
    old = key_file_data(server)
    r = requests.get(f"{server.management_url}/token", params={"type": "inference"}, timeout=30,
                     headers={"Authorization": f"Bearer {old['API']['key']}"})
    assert r.status_code == 200, r.text
    new = key_file_data(server)
    assert new["inference"]["key"] != old["inference"]["key"]
    assert post_with_key(server, old["inference"]["key"], image).status_code == 400  # the old key: refused at once
    renewed = client.renewed
    np.testing.assert_allclose(client.embed(image), reference_embeddings(example_model, "conv1", image), atol=1e-5)
    assert client.renewed == renewed  # it re-read key_file.json; no second renewal
    refused = requests.get(f"{server.management_url}/token", params={"type": "inference"}, timeout=30,
                           headers={"Authorization": f"Bearer {new['inference']['key']}"})
    assert refused.status_code == 400  # the token API takes only the API key
