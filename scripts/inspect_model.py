#!/usr/bin/env python3
"""List a model's layers with their output shapes and embedding sizes: `image-embedder inspect`, image_embedder_tools.inspect_model."""
import sys

from image_embedder_tools.inspect_model import main

if __name__ == "__main__":
    sys.exit(main())
