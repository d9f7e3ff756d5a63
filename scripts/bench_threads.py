#!/usr/bin/env python3
"""Throughput of worker x thread splits on this machine's cores: `image-embedder` tools, image_embedder/tools/bench_threads.py."""
import sys

from image_embedder.tools.bench_threads import main

if __name__ == "__main__":
    sys.exit(main())
