#!/usr/bin/env python3
"""List a model's layers with their output shapes and embedding sizes: `image-embedder` tools, image_embedder/tools/inspect_model.py."""
import sys

from image_embedder.tools.inspect_model import main

if __name__ == "__main__":
    sys.exit(main())
