"""Under load, scaling and a killed worker, a real TorchServe keeps serving and loses nothing.

One module-scoped server (shipped config, token auth on) serves the example as `encoder` and a
`picky` model whose forward raises for images 48 pixels wide. The load scenario comes from
scripts/load_test.py (its longer version is the documented benchmark): 16 clients with distinct
images, every answer checked against tests/reference.py.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import textwrap

import numpy as np
import pytest
import requests
import torch
import yaml

from build_mar import build_archive
from conftest import java_available, npy_bytes
from load_test import make_inputs, run_scenario
from reference import load_reference_model, reference_embeddings
from ts_inprocess import InProcessModel, Request
from ts_server import TorchServe

CLIENTS = 16
BATCH_SIZE = 8  # this test archive's batchSize: the requests in one batch a worker runs
CLIENT_TIMEOUT_S = 45.0  # far above any answered request here (max seen 7 s); bounds a lost one
RECOVERY_BOUND_S = 60.0  # stated in docs/reliability.md; measured figures are far below it

PICKY = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Picky(nn.Module):
        """Embeds any image except those 48 pixels wide, which its forward refuses."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.shape[-1] == 48:
                raise ValueError(f"Picky cannot take width 48, got {tuple(x.shape)}")
            return self.conv1(x)
''')


@pytest.fixture(scope="module")
def picky(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("picky")
    model_file = folder / "picky.py"
    model_file.write_text(PICKY)
    model = load_reference_model(str(model_file), "Picky")
    weights = folder / "picky.pth"
    torch.save(model.state_dict(), weights)
    config = folder / "model-config.yaml"  # batch generously, so mixed shapes share TorchServe batches
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 200,
                                      "responseTimeout": 120}))
    store = tmp_path_factory.mktemp("faults_store")
    mar = build_archive(str(model_file), "Picky", str(weights), "conv1", config_file=str(config), name="picky",
                        export_path=str(store), quiet=True)
    return {"model": model, "mar": mar, "store": str(store)}


@pytest.fixture(scope="module")
def fault_server(picky, example_archive):
    if not java_available():
        pytest.fail("TorchServe needs Java 17")
    shutil.copy(example_archive, os.path.join(picky["store"], "encoder.mar"))
    server = TorchServe(picky["store"], "encoder=encoder.mar,picky=picky.mar")
    server.start(timeout=240)
    yield server
    server.cleanup()


def picky_requests(rng) -> tuple[list[np.ndarray], list[bool]]:
    widths = [32, 48, 40, 48, 32, 36, 48, 32]
    images = [rng.random((3, 24, w), dtype=np.float32) for w in widths]
    return images, [w == 48 for w in widths]


def check_picky(model, images, refused, statuses, bodies) -> None:
    for image, bad, status, body in zip(images, refused, statuses, bodies):
        if bad:
            assert status == 422, (image.shape, status, body[:200])
            assert body["type"] == "ModelRejectedInput" and "width 48" in body["message"]
        else:
            assert status == 200, (image.shape, status, body)
            np.testing.assert_allclose(np.asarray(body["embeddings"], np.float32),
                                       reference_embeddings(model, "conv1", image), atol=1e-5)


def test_forward_error_for_one_shape_fails_only_that_shape_in_one_batch(picky):
    service = InProcessModel(picky["mar"], model_name="picky")
    images, refused = picky_requests(np.random.default_rng(0))
    responses = service.predict([Request(npy_bytes(im)) for im in images])  # exactly one TorchServe batch
    check_picky(picky["model"], images, refused, [r.status for r in responses], [r.json() for r in responses])


@pytest.mark.server
def test_forward_error_for_one_shape_fails_only_that_shape_on_a_real_server(fault_server, picky):
    images, refused = picky_requests(np.random.default_rng(1))
    url = f"{fault_server.inference_url}/predictions/picky"
    headers = fault_server.headers(**{"Content-Type": "application/x-npy"})
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(lambda im: requests.post(url, data=npy_bytes(im), headers=headers, timeout=120), images))
    check_picky(picky["model"], images, refused, [r.status_code for r in responses], [r.json() for r in responses])


@pytest.mark.server
def test_load_scaling_and_a_killed_worker(fault_server, example_model):
    inputs = make_inputs(example_model, CLIENTS, per_client=2, seed=3)
    report = run_scenario(fault_server, "encoder", inputs, duration=6.0, scale_at=2.0, kill_at=0.0,
                          timeout=CLIENT_TIMEOUT_S, tail=3.0, log=lambda *a: None)
    records, t0, events = report["records"], report["t0"], report["events"]
    kill = t0 + events["kill"]
    summary = {k: v for k, v in report.items() if k not in ("records", "t0")}  # shown whole on failure
    summary["failures"] = [(r.client, round(r.sent - t0, 2), round(r.done - t0, 2), r.status, r.detail[:160])
                           for r in report["records"] if r.outcome != "ok"]
    summary = repr(summary)
    ok = [r for r in records if r.outcome == "ok"]
    failed = [r for r in records if r.outcome not in ("ok", "timeout")]
    # every client got answers, all its own
    assert {r.client for r in ok} == set(range(CLIENTS)), summary
    assert not [r for r in records if r.outcome in ("wrong", "crossed", "connection_error")], summary
    down, end = t0 + events["scale_down"], t0 + events["scale_end"]
    # No hang, except TorchServe's own race: a worker being stopped can take a request it has just
    # been handed and clear it unanswered (WorkerThread.shutdown + cleanJobs, same family as
    # pytorch/serve#1101; seen once in ~10 runs). So at most one unanswered request, sent around
    # the scale-down or the kill; a client timeout and retry recovers it (embedding is idempotent).
    lost = [r for r in records if r.outcome == "timeout"]
    assert len(lost) <= 1, summary
    assert all(min(abs(r.sent - down), abs(r.sent - kill)) <= 2.0 for r in lost), summary
    # scaling up under load loses nothing
    assert all(r.done >= down for r in failed), summary
    assert any(t0 + events["scale_start"] <= r.sent and r.done <= down for r in ok), summary
    # scaling down: TorchServe 0.12 stops surplus workers at once, without draining them (upstream
    # pytorch/serve#1101), so the batches they hold fail with 500 "Worker died." -- at most one batch per
    # stopped worker, only requests in flight then, never a wrong answer or a hang
    at_scale_down = [r for r in failed if r.done < kill]
    assert all(r.sent <= end and r.done >= down and r.status == 500 and "Worker died" in r.detail
               for r in at_scale_down), summary
    assert len(at_scale_down) <= 2 * BATCH_SIZE, summary
    # the kill: only requests the worker held fail, each with a 5xx: all sent before the kill, and at
    # most the batch it was running plus the next one TorchServe had already handed it (seen: 16 of 16
    # clients once, 3-8 usually). Requests still in the frontend's queue go to the replacement.
    at_kill = [r for r in failed if r.done >= kill]
    assert all(r.sent <= kill and r.outcome == "http_error" and r.status >= 500 for r in at_kill), summary
    assert len(at_kill) <= 2 * BATCH_SIZE, summary
    # and service comes back: a replacement worker, then answers again, within the stated bound
    assert report["worker_back_s"] <= RECOVERY_BOUND_S, summary
    assert report["first_success_after_kill_s"] is not None and report["first_success_after_kill_s"] <= RECOVERY_BOUND_S
    assert sum(r.sent > t0 + events["replaced"] for r in ok) >= CLIENTS, summary
    print(summary)
