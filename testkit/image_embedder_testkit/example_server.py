"""A private real TorchServe serving the example archive, for test modules that scale, kill or expire things."""
from __future__ import annotations

import os
import shutil
from typing import Optional

import pytest

from image_embedder_testkit.ts_server import TorchServe, java_available


def private_example_server(example_archive: str, store: str, overrides: Optional[dict] = None,
                           timeout: float = 240.0) -> TorchServe:
    """A TorchServe of a test module's own (it scales, kills or expires things), serving the example
    as `encoder` with a READY worker; the caller calls cleanup()."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    shutil.copy(example_archive, os.path.join(store, "encoder.mar"))
    return TorchServe(store, "encoder=encoder.mar", overrides=overrides).serve("encoder", timeout=timeout)
