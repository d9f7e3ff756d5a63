"""Custom handler metrics reach TorchServe's Prometheus endpoint (metrics_mode=prometheus,
model_metrics_auto_detect=true), read with prometheus_client's own parser: the counters grow by
exactly what was sent, the gauges describe the last batch (one request of 2 images, since the
requests go one after another), and the handler's time fits inside the time the client waited."""
import time

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from image_embedder_testkit.bodies import npy_bytes

MODEL = "chlast"  # only this file's requests go to it between scrapes


def scrape(server) -> dict:
    """{(metric family, model): value} from the metrics port; it needs no token."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            model = sample.labels.get("ModelName", sample.labels.get("model_name"))
            values[(family.name, model)] = sample.value
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


def test_prometheus_text_is_read_with_the_library_parser():
    text = ('# HELP ImagesEmbedded c\n# TYPE ImagesEmbedded counter\n'
            'ImagesEmbedded{ModelName="m",Level="Model",Hostname="h",} 7.0\n')
    [family] = text_string_to_metric_families(text)
    assert (family.name, family.type, family.samples[0].labels["ModelName"], family.samples[0].value) == \
        ("ImagesEmbedded", "counter", "m", 7.0)


@pytest.mark.server
def test_prometheus_metrics_count_what_was_sent(feature_torchserve):
    r = post(feature_torchserve, npy_bytes(np.zeros((3, 16, 16), np.float32)))  # make sure every metric exists
    assert r.status_code == 200, r.text
    images, refused, frontend = ("ImagesEmbedded", MODEL), ("RequestsRefused", MODEL), ("ts_inference_requests", MODEL)
    before = scrape_until(feature_torchserve, lambda v: images in v)
    assert images in before, sorted(k for k in before if k[1] == MODEL)

    bad = post(feature_torchserve, b"not an array", "application/x-npy")
    assert bad.status_code == 400
    waited_ms = {}
    for n in (5, 2):  # one after another: each is a TorchServe batch of its own
        start = time.perf_counter()
        r = post(feature_torchserve, npy_bytes(np.ones((n, 3, 16, 16), np.float32)))
        waited_ms[n] = (time.perf_counter() - start) * 1000
        assert r.status_code == 200, r.text
        assert len(r.json()["embeddings"]) == n

    # ImagesEmbedded is the last line a batch writes and the frontend reads them in order: once the
    # count includes the last batch, every gauge read in the same scrape is that batch's
    after = scrape_until(feature_torchserve, lambda v: v.get(images, 0) >= before[images] + 7
                         and v.get(refused, 0) >= before.get(refused, 0) + 1)
    assert after[images] - before[images] == 5 + 2
    assert after[refused] - before.get(refused, 0) == 1
    assert after[frontend] - before.get(frontend, 0) == 3  # TorchServe's own count of the same requests
    # the gauges hold the last batch: one request, of 2 images
    assert after[("RequestsPerBatch", MODEL)] == 1
    assert after[("ImagesPerRequest", MODEL)] == 2
    forward, overhead, total = (after[(m, MODEL)] for m in ("ForwardTime", "HandlerOverhead", "HandlerTime"))
    assert forward > 0 and overhead >= 0
    assert total == pytest.approx(forward + overhead, abs=0.002)  # the parts add up (each rounded to 0.001 ms)
    assert total < waited_ms[2]  # the handler ran inside the time the client waited for that answer
