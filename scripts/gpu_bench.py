#!/usr/bin/env python3
"""The short in-process GPU bench: image_embedder/tools/gpu_bench.py."""
import sys

from image_embedder.tools.gpu_bench import main

if __name__ == "__main__":
    sys.exit(main())
