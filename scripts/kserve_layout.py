#!/usr/bin/env python3
"""Lay out KServe's storage folder (config/ + model-store/) from a built archive: `image-embedder kserve-layout`, image_embedder_tools.kserve_layout."""
import sys

from image_embedder_tools.kserve_layout import main

if __name__ == "__main__":
    sys.exit(main())
