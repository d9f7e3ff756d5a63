#!/usr/bin/env python3
"""The benchmark: in-process limit, TorchServe floor, served: `image-embedder bench`, image_embedder_bench.bench."""
import sys

from image_embedder_bench.bench import main

if __name__ == "__main__":
    sys.exit(main())
