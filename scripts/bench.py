#!/usr/bin/env python3
"""Every benchmark suite (layouts, payloads, fixed-cost, waits, decode, options, gpu): `image-embedder bench`."""
import sys

from image_embedder_bench.bench import main

if __name__ == "__main__":
    sys.exit(main())
