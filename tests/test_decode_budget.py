"""Decoding shares the worker's cores with its forward pass: a batch's images decode `budget()` at a
time (the worker's torch threads now), never more than the pool's own size, and each request still
gets its own images, in order. Overlap is forced by a barrier, so nothing here depends on timing."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from image_embedder.image_decoding import ImageDecoder


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("threads, budget, at_once", [(4, 2, 2), (4, 3, 3), (2, 8, 2)])
def test_images_decode_at_most_budget_at_a_time(threads, budget, at_once):
    decoder = ImageDecoder(threads=threads, budget=lambda: budget)
    decode = decoder.decode
    together = threading.Barrier(at_once, timeout=60)  # breaks (fails the test) if fewer ever run at once
    active, most, arrived, lock = [0], [0], [0], threading.Lock()

    def counted(body, where="image"):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            arrived[0] += 1
            first = arrived[0] <= at_once
        try:
            if first:  # the first `at_once` decodes meet here: they must all be running together
                together.wait()
            return decode(body, where)
        finally:
            with lock:
                active[0] -= 1

    decoder.decode = counted
    bodies = [bytearray(png(v)) for v in range(12)]
    rows = [{"img0": bodies[0], "img1": bodies[1]}, {"body": bodies[2]}, {f"p{i}": b for i, b in enumerate(bodies[3:])}]
    decoder.prefetch(rows)
    got = [decoder(b)[0] for b in bodies]
    assert most[0] == at_once
    assert [int(g[0, 0, 0, 0]) for g in got] == list(range(12))


def test_a_budget_of_one_decodes_in_the_callers_thread():
    decoder = ImageDecoder(threads=4, budget=lambda: 1)
    seen = set()
    decode = decoder.decode
    decoder.decode = lambda body, where="image": (seen.add(threading.get_ident()), decode(body, where))[1]
    bodies = [bytearray(png(v)) for v in (10, 20)]
    decoder.prefetch([{"a": bodies[0], "b": bodies[1]}])
    assert [int(decoder(b)[0][0, 0, 0, 0]) for b in bodies] == [10, 20]
    assert seen == {threading.get_ident()}
