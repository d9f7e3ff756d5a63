#!/usr/bin/env python3
"""Load, scaling and a killed worker against a real TorchServe: `image-embedder load-test`, image_embedder_testkit.load_test."""
import sys

from image_embedder_testkit.load_test import main

if __name__ == "__main__":
    sys.exit(main())
