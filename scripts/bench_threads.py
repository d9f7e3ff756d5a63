#!/usr/bin/env python3
"""Throughput of worker x thread splits on this machine's cores: `image-embedder bench-threads`, image_embedder_bench.bench_threads."""
import sys

from image_embedder_bench.bench_threads import main

if __name__ == "__main__":
    sys.exit(main())
