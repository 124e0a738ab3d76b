"""Training that gives the same weights on every machine: seeded initialization, one CPU thread."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def init_weights(net: nn.Module, generator: torch.Generator) -> None:
    """Draw every convolution and linear layer's weights and biases from
    U(−1/√fan_in, 1/√fan_in) with ``generator`` (the scale of torch's default initialization,
    without the global random state); batch-norm layers keep their deterministic defaults."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            with torch.no_grad():
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch's CPU kernels split reductions by thread count, so trained weights depend on it; one
    thread gives the same bytes on every machine, at little cost for the small models we train here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
