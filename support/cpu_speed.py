"""A CPU speed trick for model.py, applied from outside (support.checkpoint.load calls it on the
CPU); skip when reading.

MKL runs the product of a few rows (decoding) by a weight matrix on one core. Viewing W [N, K] as g
blocks of N/g rows in one batched product uses g cores: batch-1 decoding ran 1.34x to 1.55x faster
on 2 cores, extraction's batched sampling 1.02x to 1.10x (tools/bench.py (e), docs/speed.md), with
identical answers. On a GPU, or for more than 64 rows, the layer is plain F.linear.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitLinear(nn.Linear):
    """nn.Linear whose small products on the CPU are split across the torch threads; the result is
    F.linear's."""

    def forward(self, x):
        rows, (N, K), g = x.numel() // x.shape[-1], self.weight.shape, torch.get_num_threads()
        if x.device.type != "cpu" or rows > 64 or g < 2 or N % g:
            return F.linear(x, self.weight, self.bias)
        y = torch.bmm(
            x.reshape(1, rows, K).expand(g, rows, K), self.weight.view(g, N // g, K).transpose(1, 2)
        )
        y = y.transpose(0, 1).reshape(*x.shape[:-1], N)  # [g, rows, N/g] -> [..., N]
        return y if self.bias is None else y + self.bias


def split_linears(model: nn.Module, on: bool = True) -> nn.Module:
    """Give every nn.Linear of `model` the split product (on=False: plain nn.Linear again); weights
    are untouched."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.__class__ = SplitLinear if on else nn.Linear
    return model
