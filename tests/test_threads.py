"""CPU workers share the cores, and keep sharing them after scaling: each worker leaves its pid in the
model's worker folder and, when it handles a batch, sets its torch threads to its share of the cores
among the workers still alive. An explicit num_threads wins. Other workers are stood in for by real
processes (`sleep`), so "alive" and "dead" are real."""
import os
import subprocess

import numpy as np
import pytest
import torch

from image_embedder.worker_threads import WorkerThreads
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def siblings():
    """Start stand-in worker processes on demand; all stopped at the end."""
    started = []

    def start():
        proc = subprocess.Popen(["sleep", "600"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def archive(example_files, tmp_path, name, settings=None):
    return build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                     "conv1", name=name, export_path=str(tmp_path), settings=settings or {}),
                         quiet=True)


def embed_once(model):
    image = np.zeros((3, 224, 224), np.float32)
    [resp] = model.predict([Request(npy_bytes(image))])
    assert resp.status == 200, resp.body[:200]


# Six cores shared by 1, 2, 3, 4 and 7 live workers: 6, 3, 2, 1 (6 // 4 rounds down) and at least 1.
SHARES = [(1, 6), (2, 3), (3, 2), (4, 1), (7, 1)]


def test_threads_follow_the_live_workers_through_scaling(example_files, tmp_path, restore_threads, siblings):
    model = InProcessModel(archive(example_files, tmp_path, "threads_live"), model_name="threads_live")
    handler = model.service._entry_point.__self__
    threads = handler.threads
    assert threads is not None and os.path.isfile(os.path.join(threads.folder, str(os.getpid())))
    threads.cores, threads.interval = 6, 0.0  # a 6-core machine; recount on every batch
    others = []
    for workers, expected in SHARES:
        while len(others) + 1 < workers:  # scale up: another worker process registers itself
            proc = siblings()
            others.append(proc)
            open(os.path.join(threads.folder, str(proc.pid)), "w").close()
        embed_once(model)
        assert (threads.workers, torch.get_num_threads()) == (workers, expected)
    for proc in others:  # scale down (or workers killed): their pids die, the survivor gets the cores back
        proc.kill()
        proc.wait()
    embed_once(model)
    assert (threads.workers, torch.get_num_threads()) == (1, 6)
    assert os.listdir(threads.folder) == [str(os.getpid())]  # dead workers' pids are dropped


def test_recount_is_throttled(tmp_path, restore_threads, siblings):
    threads = WorkerThreads(str(tmp_path / "workers"), interval=10.0, cores=4)
    assert threads.refresh(now=100.0) == 4
    proc = siblings()
    open(os.path.join(threads.folder, str(proc.pid)), "w").close()
    assert threads.refresh(now=105.0) == 4  # within the interval: no recount
    assert threads.refresh(now=110.0) == 2


def test_explicit_num_threads_wins(example_files, tmp_path, restore_threads):
    torch.set_num_threads(7)  # anything the load must overwrite
    model = InProcessModel(archive(example_files, tmp_path, "threads3", {"num_threads": 3}), model_name="threads3")
    assert model.service._entry_point.__self__.threads is None
    embed_once(model)
    assert torch.get_num_threads() == 3


def test_read_only_model_folder_falls_back_to_max_workers(example_files, tmp_path, restore_threads, monkeypatch):
    """A worker that can't leave its pid (read-only model folder) still loads, sized from maxWorkers."""
    import yaml

    config = tmp_path / "model-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 64, "batchSize": 1, "maxBatchDelay": 1}))
    mar = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                    "conv1", name="threads_ro", export_path=str(tmp_path), config_file=str(config)),
                        quiet=True)

    makedirs = os.makedirs

    def refuse_workers_folder(path, *args, **kwargs):
        if str(path).endswith(".workers"):
            raise PermissionError(f"read-only file system: {path}")
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse_workers_folder)
    torch.set_num_threads(7)
    model = InProcessModel(mar, model_name="threads_ro")
    monkeypatch.undo()
    assert model.service._entry_point.__self__.threads is None
    assert torch.get_num_threads() == 1  # 64 workers' share of any machine with fewer than 128 cores
    embed_once(model)
