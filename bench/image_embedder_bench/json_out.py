"""A run's figures as JSON, for `--json`: what a later report or chart reads instead of the console."""
from __future__ import annotations

import json
from typing import Any, Optional


def write_json(path: Optional[str], figures: Any) -> None:
    """Write `figures` to `path` (the `--json` option; nothing when it wasn't given)."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)
