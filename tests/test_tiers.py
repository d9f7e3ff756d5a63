"""The quick tier (`scripts/test.sh --quick`, README): every test that starts no TorchServe, and only those."""
from __future__ import annotations

import os
import subprocess

import pytest

from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_server import QUICK_TIER, TorchServe


def test_quick_tier_selects_every_test_without_the_server_mark_and_no_other(request):
    proc = subprocess.run(["bash", "scripts/test.sh", "--quick", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
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
