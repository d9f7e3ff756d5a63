"""Nothing of a request outlives its answer: refusals leave no reference cycle that would hold their
batch, and the bytes malloc holds in use stay flat under the soak's mix.

The cause these guard against: an error kept as a request's answer held its traceback, whose frames
(through their callers) held the whole TorchServe batch, and the list of answers holding the error:
a cycle only Python's rare full collection frees. A worker's memory climbed by a few KB for every
refusal batched beside large requests (docs/reliability.md#memory-over-hours). Resident memory is
not compared here: glibc takes and keeps heap in steps of tens of MB, which makes RSS over a
CI-sized run noise; the hour's soak shows it."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import sys

import numpy as np
import pytest

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.photos import jpegs
from image_embedder_testkit.soak import bodies, build_example
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive

GOOD = npy_bytes(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
BAD = {  # one of each way a request is refused, each beside good ones in its batch
    "garbage .npy": (Request(bytes(2048)), 400),
    "broken JPEG": (Request(jpegs(1, 64, 48, 1)[0][:300], "image/jpeg"), 400),
    "bad KServe v2": (Request(json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                                      "data": [1.0]}]}).encode(), "application/json"), 400),
    "too many images": (Request(npy_bytes(np.zeros((9, 3, 8, 8), np.uint8))), 413),
    "shape the model refuses": (Request(npy_bytes(np.zeros((1, 3, 1, 1), np.uint8))), 422),
}


@pytest.fixture(scope="module")
def model(example_files, tmp_path_factory) -> InProcessModel:
    mar = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                    "conv1", name="refusals", export_path=str(tmp_path_factory.mktemp("refusals")),
                                    settings={"max_images_per_request": 8, "scale": 1 / 255}), quiet=True)
    return InProcessModel(mar, model_name="refusals")


@pytest.mark.parametrize("kind", list(BAD))
def test_a_refusal_leaves_no_cycle_holding_its_batch(model, kind):
    bad, status = BAD[kind]
    batch = [Request(GOOD), bad, Request(jpegs(1, 40, 30, 2)[0], "image/jpeg")]
    assert [r.status for r in model.predict(batch)] == [200, status, 200]  # warm: lazy imports, pools
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        assert [r.status for r in model.predict(batch)] == [200, status, 200]
        gc.collect()
        held = sorted({type(o).__name__ for o in gc.garbage
                       if type(o).__name__ in ("frame", "traceback", "RequestError", "DecodedRequest", "ndarray")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert held == [], f"a {kind} batch left reference cycles holding {held}"


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_in_use() -> int:
    """Bytes malloc has handed out and not got back (heap chunks in use plus mmapped ones)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_malloc_in_use_stays_flat_under_the_soak_mix(tmp_path):
    model = InProcessModel(build_example(str(tmp_path)), batch_size=8, model_name="soak")
    kinds = list(bodies().values())  # 4 uint8 images as .npy, a 640x480 JPEG, 2 KB of garbage, in turn
    requests = [Request(body, content_type) for body, content_type, _ in kinds]
    expected = [status for _, _, status in kinds]
    levels = []
    gc.disable()  # what a cycle holds stays held: the run can't pass by a collection's timing
    try:
        for n in range(1, 241):
            statuses = [r.status for r in model.predict([requests[(n * 8 + i) % 3] for i in range(8)])]
            assert statuses == [expected[(n * 8 + i) % 3] for i in range(8)]
            if n in (40, 140, 240):  # after warm-up, then every 100 batches (800 requests)
                levels.append(malloc_in_use())
    finally:
        gc.enable()
    # With the cycles (and no collection), 200 batches held 417 MB more; without, within a few hundred KB.
    assert levels[-1] - levels[0] < 4 * 2**20, f"malloc in use {[v >> 20 for v in levels]} MB"
