"""CPU workers share the cores by who is computing: a lone worker gets every core, N busy workers about
cores / N each, re-read before every forward pass. Other workers are stood in for by real processes
(`sleep`) holding slots in the same shared file, so "busy", "idle" and "dead" are real states.
An explicit num_threads wins."""
import contextlib
import os
import subprocess

import numpy as np
import pytest
import torch

from image_embedder.thread_wait import SPIN_LIMIT, spin_count
from image_embedder.worker_threads import CoreShare, share_of
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stand_ins(tmp_path):
    """Start stand-in worker processes, each with a slot in the test's shared file; all stopped at the end."""
    started = []

    def start(cores: int, path: str = str(tmp_path / "busy")) -> tuple[subprocess.Popen, CoreShare]:
        proc = subprocess.Popen(["sleep", "600"])
        started.append(proc)
        return proc, CoreShare(path, cores=cores, pid=proc.pid)

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("cores", [1, 2, 3, 6, 16])
def test_shares_split_the_cores_evenly(cores):
    for busy in range(1, 20):
        shares = [share_of(cores, busy, rank) for rank in range(busy)]
        assert min(shares) >= 1
        if busy <= cores:  # every core used, none twice
            assert sum(shares) == cores and max(shares) - min(shares) <= 1, (cores, busy, shares)
        else:  # more busy workers than cores: one thread each
            assert set(shares) == {1}


def test_alone_every_core_then_shared_then_every_core_again(tmp_path, restore_threads, stand_ins):
    me = CoreShare(str(tmp_path / "busy"), cores=6)
    with me.busy() as threads:
        assert threads == 6 and torch.get_num_threads() == 6 and me.busy_workers == 1
    with contextlib.ExitStack() as others:
        for count in (2, 3):  # other workers start computing
            _, other = stand_ins(6)
            others.enter_context(other.busy())
            with me.busy() as threads:
                assert me.busy_workers == count
                assert threads == torch.get_num_threads() == 6 // count
    with me.busy() as threads:  # they went idle: every core again
        assert (threads, me.busy_workers) == (6, 1)


def test_a_batch_narrows_between_passes_when_another_worker_starts(tmp_path, restore_threads, stand_ins):
    me = CoreShare(str(tmp_path / "busy"), cores=4)
    _, other = stand_ins(4)
    with me.busy() as first_pass:
        with other.busy():
            second_pass = me.refresh()  # what the encoder calls before each forward pass
        third_pass = me.refresh()
    assert (first_pass, second_pass, third_pass) == (4, 2, 4)


def test_a_worker_killed_while_busy_stops_counting(tmp_path, restore_threads, stand_ins):
    me = CoreShare(str(tmp_path / "busy"), cores=2)
    proc, other = stand_ins(2)
    with other.busy():
        assert me.refresh() == 1
        proc.kill()
        proc.wait()
        assert me.refresh() == 2 and me.busy_workers == 1
    _, replacement = stand_ins(2)  # the dead worker's slot is free for the next one
    assert replacement.slot == other.slot


def test_slots_are_claimed_once_per_process_and_freed_with_it(tmp_path, stand_ins):
    path = str(tmp_path / "busy")
    me = CoreShare(path, cores=2)
    proc, other = stand_ins(2)
    assert CoreShare(path, cores=2).slot == me.slot  # the same process again: its own slot
    assert other.slot != me.slot
    proc.kill()  # a worker gives its slot back by ending: scaled down, stopped or killed alike
    proc.wait()
    _, third = stand_ins(2)
    assert third.slot == other.slot


def archive(example_files, tmp_path, name, settings=None):
    return build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                     "conv1", name=name, export_path=str(tmp_path), settings=settings or {}),
                         quiet=True)


def embed(model, images: int = 1):
    [resp] = model.predict([Request(npy_bytes(np.zeros((images, 3, 64, 64), np.float32)))])
    assert resp.status == 200, resp.body[:200]


def test_handler_sizes_every_pass_and_goes_idle_after_the_batch(example_files, tmp_path, restore_threads,
                                                                stand_ins, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the shared file of this "server"
    monkeypatch.setattr("tempfile.tempdir", None)
    model = InProcessModel(archive(example_files, tmp_path, "threads_share", {"default_batch_size": 2}),
                           model_name="threads_share")
    handler = model.handler
    me = handler.cores
    assert me is not None and me.path == str(tmp_path / f"image-embedder-busy-workers-{os.getuid()}")
    me.cores = 4
    _, other = stand_ins(4, me.path)
    passes = []
    refresh = handler.encoder.before_pass

    def before_pass():
        threads = refresh()
        passes.append((threads, me.busy_workers))
        if len(passes) == 1:  # another worker starts computing after this batch's first pass began
            stack.enter_context(other.busy())

    handler.encoder.before_pass = before_pass
    with contextlib.ExitStack() as stack:
        embed(model, images=6)  # three passes of 2
    assert passes == [(4, 1), (2, 2), (2, 2)]
    assert me._table[me.slot, 1] == 0  # idle once the batch is answered
    passes.clear()
    embed(model, images=2)
    assert passes == [(4, 1)]  # alone again


def test_explicit_num_threads_wins(example_files, tmp_path, restore_threads):
    torch.set_num_threads(7)  # anything the load must overwrite
    model = InProcessModel(archive(example_files, tmp_path, "threads3", {"num_threads": 3}), model_name="threads3")
    assert model.handler.cores is None
    embed(model)
    assert torch.get_num_threads() == 3


def test_no_writable_temporary_folder_falls_back_to_max_workers(example_files, tmp_path, restore_threads, monkeypatch):
    """A worker that can't open the shared file still loads, with a fixed share from maxWorkers."""
    import yaml

    config = tmp_path / "model-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 64, "batchSize": 1, "maxBatchDelay": 1}))
    mar = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                    "conv1", name="threads_ro", export_path=str(tmp_path), config_file=str(config)),
                        quiet=True)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    (tmp_path / f"image-embedder-busy-workers-{os.getuid()}").mkdir()  # a folder where the file would be
    torch.set_num_threads(7)
    model = InProcessModel(mar, model_name="threads_ro")
    assert model.handler.cores is None
    assert torch.get_num_threads() == 1  # 64 workers' share of any machine with fewer than 128 cores
    embed(model)


@pytest.fixture(scope="module")
def plain_archive(example_files, tmp_path_factory):
    return archive(example_files, tmp_path_factory.mktemp("plain"), "threads_plain")


@pytest.mark.parametrize("env, others, warns", [
    ({}, 1, True),  # libgomp's default: 300 000 spins after each parallel region
    ({"OMP_WAIT_POLICY": "active"}, 2, True),
    ({"GOMP_SPINCOUNT": "1M"}, 1, True),
    ({"GOMP_SPINCOUNT": "10000"}, 1, False),  # the launchers' limit
    ({"GOMP_SPINCOUNT": "10k", "OMP_WAIT_POLICY": "ACTIVE"}, 1, False),  # the count wins over the policy
    ({"OMP_WAIT_POLICY": "passive"}, 1, False),  # no spinning at all
    ({}, 0, False),  # alone: nobody to slow down
])
def test_a_worker_beside_others_warns_when_threads_spin(plain_archive, tmp_path, restore_threads, stand_ins,
                                                        monkeypatch, caplog, env, others, warns):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    for name in (SPIN_LIMIT[0], "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for _ in range(others):  # workers already holding slots in this server's shared file
        stand_ins(2, str(tmp_path / f"image-embedder-busy-workers-{os.getuid()}"))
    with caplog.at_level("WARNING"):
        model = InProcessModel(plain_archive, model_name="threads_plain")
    assert model.handler.cores.live_workers() == others + 1
    warnings = [r.getMessage() for r in caplog.records if "spin" in r.getMessage()]
    if warns:
        assert len(warnings) == 1 and f"{others + 1} workers" in warnings[0]
        assert f"{SPIN_LIMIT[0]}={SPIN_LIMIT[1]}" in warnings[0]
        assert all(f"{k}={v}" in warnings[0] for k, v in env.items()) or "neither set" in warnings[0]
    else:
        assert warnings == []


@pytest.mark.parametrize("env, spins", [
    ({}, 300_000), ({"OMP_WAIT_POLICY": "PASSIVE"}, 0), ({"OMP_WAIT_POLICY": "Active"}, float("inf")),
    ({"GOMP_SPINCOUNT": "250"}, 250), ({"GOMP_SPINCOUNT": " 3 k "}, 3000), ({"GOMP_SPINCOUNT": "2G"}, 2 * 10**9),
    ({"GOMP_SPINCOUNT": "Infinite", "OMP_WAIT_POLICY": "PASSIVE"}, float("inf")),
    ({"GOMP_SPINCOUNT": "lots", "OMP_WAIT_POLICY": "PASSIVE"}, 0),  # unreadable: the policy decides
])
def test_spin_count_as_libgomp_reads_it(env, spins):
    assert spin_count(env) == spins


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: one thread never throttled, not two that would be
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.cfs_quota_us": "400000\n", "cpu.cfs_period_us": "100000\n"}, 4),
    ({"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_limit_of_a_container(tmp_path, files, expected):
    from image_embedder.worker_threads import cpu_quota

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert cpu_quota((str(tmp_path / "cpu.max"), str(tmp_path / "cpu.cfs_quota_us"))) == expected


def test_cores_are_capped_by_the_cpu_limit(monkeypatch):
    import image_embedder.worker_threads as wt

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a node's 64 cores
    monkeypatch.setattr(wt, "cpu_quota", lambda: 2)  # a pod limited to 2 CPUs
    assert wt.available_cores() == 2
    monkeypatch.setattr(wt, "cpu_quota", lambda: None)
    assert wt.available_cores() == 64
