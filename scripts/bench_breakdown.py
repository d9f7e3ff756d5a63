#!/usr/bin/env python3
"""Where one request's time goes; worker layouts: image_embedder/tools/bench_breakdown.py."""
import sys

from image_embedder.tools.bench_breakdown import main

if __name__ == "__main__":
    sys.exit(main())
