"""Files of the checkout the tools are installed from (`pip install -e .`): the example, the shipped config.

Only the repository's own tools need them (bench, load test, test servers); building an archive
and the client need none.
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EXAMPLE_MODEL = os.path.join(REPO, "examples", "custom_model", "model.py")
SHIPPED_CONFIG = os.path.join(REPO, "config.properties")
