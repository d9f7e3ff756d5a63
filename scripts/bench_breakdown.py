#!/usr/bin/env python3
"""Where one request's time goes; worker layouts: `image-embedder bench-breakdown`, image_embedder_bench.bench_breakdown."""
import sys

from image_embedder_bench.bench_breakdown import main

if __name__ == "__main__":
    sys.exit(main())
