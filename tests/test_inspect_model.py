"""inspect_model.py: hooks on every submodule give each layer's output shape and embedding sizes,
also for a model torch.fx cannot trace (data-dependent control flow)."""
import json
import os
import sys
import textwrap

import pytest
import torch

from image_embedder_testkit import background
from image_embedder_testkit.background import Completed, Lane
from image_embedder_testkit.checkout import REPO

SCRIPT = os.path.join(REPO, "scripts", "inspect_model.py")

BRANCHY = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Branchy(nn.Module):
        """Data-dependent control flow: torch.fx cannot trace `if x.sum() >= 0`."""

        def __init__(self, width=4):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.pos = nn.Sequential(nn.Conv2d(width, 8, 3, stride=2), nn.ReLU())
            self.neg = nn.Conv2d(width, 8, 1)
            self.tokens = nn.Linear(8, 6)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            if x.sum() >= 0:  # always true here, but only a real run can tell
                x = self.pos(x)
            else:
                x = self.neg(x)
            t = self.tokens(x.flatten(2).transpose(1, 2))  # (N, T, 6)
            return t.mean(1)
''')


EXAMPLE = os.path.join(REPO, "examples", "custom_model", "model.py")
# Every command line the tests below read, by name; {branchy} and {ddp} are the job's files.
RUNS = {
    "untraceable": ("--model-file", "{branchy}", "--model-class", "Branchy", "--model-kwargs", '{{"width": 4}}',
                    "--input-shape", "3,16,12", "--json"),
    "example": ("--model-file", EXAMPLE, "--model-class", "CustomModel", "--input-shape", "3,224,224"),
    "bad shape": ("--model-file", EXAMPLE, "--model-class", "CustomModel", "--input-shape", "3,x,224"),
    "rejected shape": ("--model-file", EXAMPLE, "--model-class", "CustomModel", "--input-shape", "3,64,64"),
    "bad kwargs": ("--model-file", EXAMPLE, "--model-class", "CustomModel", "--input-shape", "3,8,8",
                   "--model-kwargs", "[1]"),
    "kernel larger than input": ("--model-file", "{branchy}", "--model-class", "Branchy", "--input-shape", "3,2,2"),
    "wrong channels": ("--model-file", "{branchy}", "--model-class", "Branchy", "--input-shape", "4,8,8"),
    "wrapped checkpoint": ("--model-file", "{branchy}", "--model-class", "Branchy", "--input-shape", "3,8,8",
                           "--state-dict", "{ddp}", "--json"),
    "wrapped, no detection": ("--model-file", "{branchy}", "--model-class", "Branchy", "--input-shape", "3,8,8",
                              "--state-dict", "{ddp}", "--no-detect"),
}


def branchy() -> torch.nn.Module:
    namespace: dict = {}
    exec(BRANCHY, namespace)
    return namespace["Branchy"]()


def run_every_command(lane: Lane, folder: str) -> dict[str, Completed]:
    """The script on each of RUNS (a process each: the script's own start, exit status and output), with
    branchy.py and a DDP-wrapped checkpoint of it (ddp.pth) in `folder`."""
    files = {"branchy": os.path.join(folder, "branchy.py"), "ddp": os.path.join(folder, "ddp.pth")}
    with open(files["branchy"], "w") as f:
        f.write(BRANCHY)
    torch.save({"state_dict": {"module." + k: v for k, v in branchy().state_dict().items()}, "epoch": 1}, files["ddp"])
    return {name: lane.run([sys.executable, SCRIPT, *(a.format(**files) for a in args)], cwd=folder,
                           env=dict(os.environ), timeout=300) for name, args in RUNS.items()}


INSPECT = background.job("inspect_model.py runs", run_every_command)


def run_inspect(name: str) -> Completed:
    return INSPECT.result()[name]


@pytest.mark.background(INSPECT.name)
def test_untraceable_model_table_matches_real_forward():
    with pytest.raises(Exception):  # the premise: torch.fx cannot trace it
        torch.fx.symbolic_trace(branchy())

    out = run_inspect("untraceable")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert list(rows) == ["stem", "pos", "pos.0", "pos.1", "neg", "tokens"]
    assert rows["stem"]["type"] == "Conv2d" and rows["stem"]["shape"] == [1, 4, 16, 12]
    assert rows["stem"]["sizes"] == {"avg": 4, "max": 4, "gem": 4, "cls": None, "none": 4 * 16 * 12}
    # pos.0: 3x3 stride 2 on 16x12 -> 7x5; the branch not taken is reported, not guessed
    assert rows["pos"]["type"] == "Sequential" and rows["pos.0"]["shape"] == [1, 8, 7, 5]
    assert rows["pos.1"]["type"] == "ReLU" and rows["pos.1"]["sizes"]["max"] == 8
    assert rows["neg"]["shape"] is None and rows["neg"]["note"] == "did not run"
    # tokens: (N, T=35, 6): cls applies to a token output, none flattens T*D
    assert rows["tokens"]["shape"] == [1, 35, 6]
    assert rows["tokens"]["sizes"] == {"avg": 6, "max": 6, "gem": 6, "cls": 6, "none": 35 * 6}


@pytest.mark.background(INSPECT.name)
def test_table_text_for_the_example():
    out = run_inspect("example")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:8] == ["layer", "type", "output", "shape", "avg", "max", "gem", "cls"]
    conv1 = next(line.split() for line in lines if line.startswith("conv1 "))
    assert conv1[:4] == ["conv1", "Conv2d", "1x10x220x220", "10"] and conv1[7] == str(10 * 220 * 220)
    fc1 = next(line.split() for line in lines if line.startswith("fc1 "))
    assert fc1[:4] == ["fc1", "Linear", "1x120", "120"]


@pytest.mark.background(INSPECT.name)
def test_bad_shape_and_kwargs_are_clear_errors():
    out = run_inspect("bad shape")
    assert out.returncode == 2 and "--input-shape '3,x,224'" in out.stderr
    out = run_inspect("rejected shape")
    assert out.returncode == 1 and "forward pass on shape 3,64,64 failed" in out.stderr
    out = run_inspect("bad kwargs")
    assert out.returncode == 2 and "JSON object" in out.stderr


@pytest.mark.background(INSPECT.name)
def test_a_rejected_shape_lists_the_layers_that_ran_before_it():
    """CustomModel's `x.view(-1, 16*53*53)` needs 224x224: at 64x64 conv1, pool, conv2 ran, then its own forward failed."""
    out = run_inspect("rejected shape")
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert lines[0].startswith("error: the forward pass on shape 3,64,64 failed in CustomModel.forward itself, "
                               "after `pool`: RuntimeError: shape '[-1, 44944]' is invalid")
    assert lines[1].startswith("layers that ran before it (3, in order")
    table = [line.split() for line in lines[2:]]
    assert table[0][:3] == ["layer", "type", "output"]
    # 64 -conv5-> 60 -pool-> 30 -conv5-> 26: shapes worked out by hand
    assert [row[:3] for row in table[1:]] == [["conv1", "Conv2d", "1x10x60x60"], ["pool", "MaxPool2d", "1x10x30x30"],
                                             ["conv2", "Conv2d", "1x16x26x26"]]


@pytest.mark.background(INSPECT.name)
def test_a_failure_inside_a_nested_layer_names_it():
    # 3x2x2: stem keeps 2x2, then pos.0's 3x3 kernel is larger than its input
    out = run_inspect("kernel larger than input")
    assert out.returncode == 1
    assert "failed inside `pos.0`: RuntimeError" in out.stderr
    ran = [line.split()[0] for line in out.stderr.splitlines()[3:]]  # after the error, the count, the header
    assert ran == ["stem"]
    out = run_inspect("wrong channels")
    assert "failed inside `stem`" in out.stderr and "no layer ran before it" in out.stderr


@pytest.mark.background(INSPECT.name)
def test_weights_of_a_wrapped_checkpoint():
    """A DDP checkpoint (`module.` keys under `state_dict`) is detected; with --no-detect, the fix is named."""
    out = run_inspect("wrapped checkpoint")
    assert out.returncode == 0, out.stderr
    out = run_inspect("wrapped, no detection")
    assert out.returncode == 2 and "add --checkpoint-key state_dict --strip-prefix module." in out.stderr
