#!/usr/bin/env python3
"""Build a model archive (.mar) from your model file, class, weights and layer: `image-embedder build`, image_embedder_tools.build."""
import sys

from image_embedder_tools.build import main

if __name__ == "__main__":
    sys.exit(main())
