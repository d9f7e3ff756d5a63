"""A serve-only install does what a server needs and nothing more: in a scratch copy of this checkout
with no .venv, `scripts/serve.sh` (which runs `scripts/setup_env.sh --serve`, as the Dockerfiles do)
installs requirements-serve.txt alone, builds the example archive, starts TorchServe and answers a
request; the test, bench and example packages are absent from that environment. A background job:
the install takes a minute."""
from __future__ import annotations

import os

import pytest

from image_embedder_testkit import background
from image_embedder_testkit.background import Completed, Lane
from image_embedder_testkit.scratch import free_ports, scratch_copy

pytestmark = pytest.mark.server
ABSENT = ("pytest", "openai", "lancedb", "sklearn", "matplotlib", "tritonclient", "kserve")


def install_and_serve(lane: Lane, folder: str) -> tuple[Completed, Completed, Completed, str]:
    checkout = os.path.join(folder, "checkout")
    scratch_copy(checkout, [str(p) for p in free_ports(5)], link_venv=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    served = lane.run(["bash", "scripts/serve.sh"], cwd=checkout, env=env, timeout=480)
    probe = ("import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))")
    present = lane.run([".venv/bin/python", "-c", probe, *ABSENT], cwd=checkout, env=env, timeout=60)
    stopped = lane.run(["bash", "scripts/serve.sh", "--stop"], cwd=checkout, env=env, timeout=120)
    stamps = sorted(name for name in os.listdir(os.path.join(checkout, ".venv")) if name.endswith(".sha"))
    return served, present, stopped, " ".join(stamps)


SERVE_ONLY = background.job("serve-only install", install_and_serve)


@pytest.mark.background(SERVE_ONLY.name)
def test_a_serve_only_install_builds_serves_and_holds_nothing_else():
    served, present, stopped, stamps = SERVE_ONLY.result()
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-4000:]
    assert "served: POST /predictions/encoder -> embedding of shape (10,)" in served.stdout
    assert present.returncode == 0 and present.stdout.split() == [], present.stdout + present.stderr
    assert stopped.returncode == 0, stopped.stderr
    assert stamps == ".serve.sha"  # the serve set, not everything
