"""A model whose embedding is the number of torch threads its forward pass ran with, and that can be
held mid-pass, so a test can have workers computing at the same moment without timing anything.

An image whose first value is 1 holds its pass: the model leaves `<gate>/entered-<pid>` and waits until
that file is gone (the test deletes it to let the pass finish).
"""
import os
import time

import torch
from torch import nn


class ThreadProbe(nn.Module):
    def __init__(self, gate: str = "") -> None:
        super().__init__()
        self.gate = gate
        self.probe = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()  # set by the handler just before this pass
        if self.gate and float(x.flatten()[0]) == 1.0:
            entered = os.path.join(self.gate, f"entered-{os.getpid()}")
            open(entered, "w").close()
            deadline = time.monotonic() + 300
            while os.path.exists(entered) and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.probe(x.new_full((x.shape[0], 1), float(threads)))
