#!/usr/bin/env python3
"""The benchmark: in-process limit, TorchServe floor, served: `image-embedder` tools, image_embedder/tools/bench.py."""
import sys

from image_embedder.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
