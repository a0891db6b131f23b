"""Feedback Alignment (Lillicrap, Cownden, Tweed, Akerman, "Random synaptic feedback weights support error
backpropagation for deep learning", Nature Communications 7:13276, 2016).

Backpropagation with each transposed forward matrix replaced by a fixed random matrix of the same shape.
With blocks h_l = f_l(a_l), a_l = W_l h_{l-1} + b_l, h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B:

    output:        delta_L = dL/da_L = (p - y) / B                        (through the output block's post, if any)
    hidden:        delta_l = (delta_{l+1} B_{l+1}) * f_l'(a_l)            (BP would use delta_{l+1} W_{l+1})
    updates:       grad W_l = delta_l^T h_{l-1},  grad b_l = sum_batch delta_l

B_l (same shape as W_l, fixed, never trained) exists for l = 2 .. L; the first layer needs none. B_l ~ b_scale *
U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot uniform, the standard init of W_l), drawn once on the first step
from its own generator seeded with `seed`, so it does not disturb other randomness; it lives in state_dict.

Implementation: every block runs on a detached input, so no graph crosses a layer. The error is carried backward
by hand (delta_{l+1} @ B_{l+1}); f_l' is applied by autograd on block l's own post (so LayerNorm in the post is
handled exactly), and one backward call from the pre-activations fills every weight gradient. With B_l = W_l the
update is exactly BP's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import Net
from ._common import (PeerRule, fit_matrices, glorot_uniform, linear_weight, local_forward, need_hidden,
                      output_error)
from .base import StepOutput, check_batch


@dataclass
class FA(PeerRule):
    """Feedback alignment; options: the scale of the feedback matrices and their seed."""

    name = "fa"
    b_scale: float = 1.0   # multiplier on the Glorot-uniform range of each B_l
    seed: int = 0          # seeds the B_l, independently of the model's initialisation
    B: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # B_2 .. B_L (blocks[1:])

    def __post_init__(self) -> None:
        if not self.b_scale > 0:
            raise ValueError(f"fa: b_scale must be > 0, got {self.b_scale}")

    def _feedback(self, model: Net, like: torch.Tensor) -> list[torch.Tensor]:
        shapes = [tuple(linear_weight(b, "fa").shape) for b in model.blocks[1:]]
        if self.B is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.B = [glorot_uniform(o, i, self.b_scale, gen, like) for o, i in shapes]
        self.B = fit_matrices("fa: B", self.B, shapes, like)
        return self.B

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        check_batch(model, x, y)
        need_hidden(model, "fa")
        model.zero_grad(set_to_none=True)
        inputs, pre, outs = local_forward(model, x)
        z = outs[-1]
        loss, _, e = output_error(z, y)
        B = self._feedback(model, z)

        deltas: list[torch.Tensor] = [torch.empty(0)] * len(pre)
        g = e / x.shape[0]                            # dL/dh_L
        for l in range(len(pre) - 1, -1, -1):
            deltas[l] = torch.autograd.grad(outs[l], pre[l], g, retain_graph=True)[0]  # through post_l: * f_l'(a_l)
            if l > 0:
                g = deltas[l] @ B[l - 1]              # dL/dh_{l-1} with B_l in place of W_l
        torch.autograd.backward(pre, deltas)
        return StepOutput(loss, z.detach())

    def state_dict(self) -> dict[str, Any]:
        return {} if self.B is None else {"B": list(self.B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"B"}
        if unknown:
            raise ValueError(f"fa: unknown state keys {sorted(unknown)}")
        self.B = [b.clone() for b in state["B"]] if "B" in state else None
