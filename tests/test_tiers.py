"""The quick tier (`scripts/test.sh --quick`, README): every test that starts no TorchServe, and only those."""
from __future__ import annotations

import os

import pytest

from image_embedder_testkit import background
from image_embedder_testkit.background import Completed, Lane
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_server import QUICK_TIER, TorchServe


def collect_quick_tier(lane: Lane, folder: str) -> Completed:
    """`scripts/test.sh --quick --collect-only`: what the quick tier would run."""
    return lane.run(["bash", "scripts/test.sh", "--quick", "--collect-only", "-q", "-p", "no:cacheprovider"],
                    cwd=REPO, env=dict(os.environ, TMPDIR=folder), timeout=300)


QUICK_COLLECTION = background.job("quick tier collection", collect_quick_tier)


@pytest.mark.background(QUICK_COLLECTION.name)
def test_quick_tier_selects_every_test_without_the_server_mark_and_no_other(request):
    proc = QUICK_COLLECTION.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    quick = {line.strip() for line in proc.stdout.splitlines() if "::" in line}
    assert quick, proc.stdout[-3000:]
    here = {item.nodeid: item.get_closest_marker("server") is not None for item in request.session.items}
    assert quick.isdisjoint(node for node, server in here.items() if server)
    assert {node for node, server in here.items() if not server} <= quick


def test_a_test_that_starts_torchserve_without_the_mark_fails_in_the_quick_tier(monkeypatch, model_store):
    monkeypatch.setenv(QUICK_TIER, "1")
    server = TorchServe(model_store)
    try:
        with pytest.raises(RuntimeError, match="mark it @pytest.mark.server"):
            server.start()
        assert getattr(server, "process", None) is None  # nothing was started
    finally:
        server.cleanup()
    assert not os.path.exists(server.workdir)
