#!/usr/bin/env python3
"""The short in-process GPU bench: `image-embedder gpu-bench`, image_embedder_bench.gpu_bench."""
import sys

from image_embedder_bench.gpu_bench import main

if __name__ == "__main__":
    sys.exit(main())
