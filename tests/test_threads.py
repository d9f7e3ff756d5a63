"""CPU workers share the cores: without num_threads, each of maxWorkers workers gets cores // maxWorkers
torch threads; an explicit num_threads wins."""
import os

import pytest
import torch
import yaml

from build_mar import ArchiveSpec, build_archive
from ts_inprocess import InProcessModel


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cores() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers, num_threads, expected", [
    (1, None, lambda: cores()),
    (2, None, lambda: max(1, cores() // 2)),
    (64, None, lambda: 1),
    (2, 3, lambda: 3),
])
def test_worker_threads_follow_max_workers(example_files, tmp_path, restore_threads, workers, num_threads, expected):
    config = tmp_path / "model-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": workers, "batchSize": 1, "maxBatchDelay": 1}))
    extra = {"num_threads": num_threads} if num_threads else {}
    mar = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"], "conv1",
                        config_file=str(config), name=f"threads{workers}", export_path=str(tmp_path), settings=extra),
                        quiet=True)
    torch.set_num_threads(7)  # anything the load must overwrite
    InProcessModel(mar, model_name=f"threads{workers}")
    assert torch.get_num_threads() == expected()
