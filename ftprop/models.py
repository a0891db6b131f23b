"""Models as sequences of blocks that learning rules can walk layer by layer.

A block is one "layer" in the sense of local learning rules: a parametrised
operation (`layer`, e.g. Linear) followed by parameter-free operations
(`post`, e.g. normalisation and the nonlinearity). Rules that need the
pre-activation a_l = layer(h_{l-1}) (for f'(a_l)) or that must run the block on
a target instead of an activation (the second pass of FTP) use the two halves
separately; everything else just calls the block.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
NORMS = ("none", "layernorm")
INITS = ("torch", "auto", "xavier", "kaiming")  # torch: PyTorch's default; auto: xavier for tanh/sigmoid, kaiming otherwise


class Block(nn.Module):
    """`post(layer(x))`: one unit of local learning."""

    def __init__(self, layer: nn.Module, post: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.layer(x))


class Net(nn.Module):
    """A classifier made of `blocks`, applied in order; the last block's output are logits.

    `flatten_input` lets an MLP take image tensors (N, C, H, W) directly, so
    datasets keep one layout for every model.
    """

    def __init__(self, blocks: Sequence[Block], flatten_input: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.flatten_input = flatten_input

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.flatten_input else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prepare(x)
        for block in self.blocks:
            h = block(h)
        return h


def parse_hidden(hidden: str | Sequence[int]) -> tuple[int, ...]:
    """'1024,128' -> (1024, 128), with a clear error for anything else."""
    if isinstance(hidden, str):
        parts = [p.strip() for p in hidden.split(",") if p.strip()]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--hidden must be a comma-separated list of positive integers, got {hidden!r}") from None
    else:
        sizes = tuple(int(h) for h in hidden)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"--hidden must be a non-empty list of positive integers, got {hidden!r}")
    return sizes


def _init_linear(layer: nn.Linear, activation: str, init: str) -> None:
    if init == "torch":
        return  # PyTorch's own default (kaiming_uniform with a=sqrt(5))
    if init == "auto":
        init = "xavier" if activation in ("tanh", "sigmoid") else "kaiming"
    if init == "xavier":
        gain = nn.init.calculate_gain("tanh") if activation == "tanh" else 1.0
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    else:
        slope = 0.01 if activation == "leaky_relu" else 0.0
        nn.init.kaiming_uniform_(layer.weight, a=slope, nonlinearity="leaky_relu")
    nn.init.zeros_(layer.bias)


def mlp(in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "tanh",
        norm: str = "none", init: str = "torch") -> Net:
    """Fully connected net in_features-hidden...-num_classes.

    norm='layernorm' inserts a LayerNorm without affine parameters before each
    hidden nonlinearity (a scale-invariant block; see docs/ALGORITHM.md).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    sizes = [in_features, *hidden]
    blocks: list[Block] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layer = nn.Linear(d_in, d_out)
        _init_linear(layer, activation, init)
        post = [nn.LayerNorm(d_out, elementwise_affine=False)] if norm == "layernorm" else []
        blocks.append(Block(layer, nn.Sequential(*post, ACTIVATIONS[activation]())))
    head = nn.Linear(sizes[-1], num_classes)
    _init_linear(head, "linear", "xavier" if init == "auto" else init)
    blocks.append(Block(head))
    return Net(blocks, flatten_input=True)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, hidden: str | Sequence[int] = (1024, 128),
                activation: str = "tanh", norm: str = "none", init: str = "torch") -> Net:
    """Model factory used by the CLI and the trainer."""
    if name == "mlp":
        return mlp(math.prod(input_shape), parse_hidden(hidden), num_classes, activation, norm, init)
    raise ValueError(f"unknown model {name!r}; choose one of: mlp")
