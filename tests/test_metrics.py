"""Custom handler metrics reach TorchServe's Prometheus endpoint (metrics_mode=prometheus,
model_metrics_auto_detect=true): the image counter grows by exactly what was sent, refusals are
counted, images per request and the timings are present and plausible."""
import re
import time

import numpy as np
import pytest
import requests

from conftest import npy_bytes

pytestmark = pytest.mark.server
MODEL = "chlast"  # only this file's requests go to it between scrapes


def scrape(server) -> dict:
    """{(metric, model): value} from the metrics port; it needs no token."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        match = re.match(r'^(\w+)\{([^}]*)\}\s+(\S+)$', line)
        if match:
            model = re.search(r'ModelName="([^"]*)"', match.group(2))
            values[(match.group(1), model.group(1) if model else None)] = float(match.group(3))
    return values


def scrape_until(server, check, timeout=30.0) -> dict:
    """The backend's metric lines reach the frontend asynchronously: poll until `check` holds."""
    deadline = time.time() + timeout
    while True:
        values = scrape(server)
        if check(values) or time.time() > deadline:
            return values
        time.sleep(0.3)


def post(server, body, content_type="application/x-npy"):
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", data=body, timeout=120,
                         headers=server.headers(**{"Content-Type": content_type}))


def test_prometheus_metrics_count_what_was_sent(feature_torchserve):
    r = post(feature_torchserve, npy_bytes(np.zeros((3, 16, 16), np.float32)))  # make sure every metric exists
    assert r.status_code == 200, r.text
    before = scrape_until(feature_torchserve, lambda v: ("ImagesEmbedded", MODEL) in v)
    assert ("ImagesEmbedded", MODEL) in before, sorted(k for k in before if k[1] == MODEL)
    sent = 0
    for n in (5, 2):
        r = post(feature_torchserve, npy_bytes(np.ones((n, 3, 16, 16), np.float32)))
        assert r.status_code == 200, r.text
        sent += n
    last_request = 2
    bad = post(feature_torchserve, b"not an array", "application/x-npy")
    assert bad.status_code == 400

    key = ("ImagesEmbedded", MODEL)
    after = scrape_until(feature_torchserve, lambda v: v.get(key, 0) >= before[key] + sent
                         and v.get(("RequestsRefused", MODEL), 0) > before.get(("RequestsRefused", MODEL), 0))
    assert after[key] - before[key] == sent
    assert after[("RequestsRefused", MODEL)] - before.get(("RequestsRefused", MODEL), 0) == 1
    # gauges hold the last batch with embeddings: one request of 2 images
    assert after[("ImagesPerRequest", MODEL)] == last_request
    assert after[("RequestsPerBatch", MODEL)] >= 1
    forward, overhead, total = (after[(m, MODEL)] for m in ("ForwardTime", "HandlerOverhead", "HandlerTime"))
    assert 0 < forward < 60_000 and 0 <= overhead < 60_000 and 0 < total < 60_000
