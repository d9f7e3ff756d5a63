#!/usr/bin/env python3
"""Embed a folder of images or .npy files through a running server: `image-embedder embed`, image_embedder_tools.embed."""
import sys

from image_embedder_tools.embed import main

if __name__ == "__main__":
    sys.exit(main())
