"""Module construction shared by the models."""
import torch
from torch import nn


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim) with its own init (standard normal), except on the meta device, where checkpoint
    loading builds models: normal_ has no meta kernel there and falls back to a path that imports torch._dynamo,
    seconds of every `bigr` call. The same random draws as nn.Embedding elsewhere."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)
