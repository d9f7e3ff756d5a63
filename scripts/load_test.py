#!/usr/bin/env python3
"""Load, scaling and a killed worker against a real TorchServe: `image-embedder` tools, image_embedder/tools/load_test.py."""
import sys

from image_embedder.tools.load_test import main

if __name__ == "__main__":
    sys.exit(main())
