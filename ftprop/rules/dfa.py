"""Direct Feedback Alignment (Nokland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks",
NeurIPS 2016).

The output error is sent straight to every hidden layer through a fixed random matrix. With blocks
h_l = f_l(a_l), a_l = W_l h_{l-1} + b_l, h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B:

    output error:  e = p - y
    hidden:        d_l = (e B_l) * f_l'(a_l),   l = 1 .. L-1            (B_l: n_out x |h_l|, fixed random)
    output:        d_L = e
    updates:       grad W_l = d_l^T h_{l-1} / B,  grad b_l = sum_batch d_l / B

B_l ~ b_scale * U(-a, a), a = sqrt(6 / (n_out + |h_l|)) (Glorot uniform for an n_out -> |h_l| matrix), drawn once on
the first step from its own generator seeded with `seed`; it lives in state_dict.

Implementation: every block runs on a detached input, so no graph crosses a layer; (e B_l) / B is the gradient
applied to h_l and autograd through block l's own post supplies f_l' (exact for LayerNorm in the post too). A
hidden layer's update depends on the rest of the network only through e.

Convolutional and residual blocks: |h_l| is the block's whole output (C x H x W for a conv map), B_l projects onto it
flattened, and (e B_l) / B enters the block's output, so autograd through the block's own graph (post, normalisation,
conv; both convs and the shortcut of a residual block) turns it into every parameter gradient of the block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import Net, as_net
from ._common import PeerRule, fit_matrices, glorot_uniform, local_forward, need_hidden, num_features, output_error
from .base import StepOutput, check_batch


@dataclass
class DFA(PeerRule):
    """Direct feedback alignment; options: the scale of the feedback matrices and their seed."""

    name = "dfa"
    b_scale: float = 1.0   # multiplier on the Glorot-uniform range of each B_l
    seed: int = 0          # seeds the B_l, independently of the model's initialisation
    B: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # one per hidden block

    def __post_init__(self) -> None:
        if not self.b_scale > 0:
            raise ValueError(f"dfa: b_scale must be > 0, got {self.b_scale}")

    def _feedback(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        n_out = num_features(outs[-1])
        shapes = [(n_out, num_features(h)) for h in outs[:-1]]
        if self.B is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.B = [glorot_uniform(o, n, self.b_scale, gen, outs[-1]) for o, n in shapes]
        self.B = fit_matrices("dfa: B", self.B, shapes, outs[-1])
        return self.B

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        check_batch(model, x, y)
        model = as_net(model)
        need_hidden(model, "dfa")
        model.zero_grad(set_to_none=True)
        _, _, outs = local_forward(model, x)
        z = outs[-1]
        loss, _, e = output_error(z, y)
        e_b = e / x.shape[0]
        grads = [(e_b @ b).view_as(h) for b, h in zip(self._feedback(outs), outs[:-1])]
        torch.autograd.backward(outs, [*grads, e_b])
        return StepOutput(loss, z.detach())

    def state_dict(self) -> dict[str, Any]:
        return {} if self.B is None else {"B": list(self.B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"B"}
        if unknown:
            raise ValueError(f"dfa: unknown state keys {sorted(unknown)}")
        self.B = [b.clone() for b in state["B"]] if "B" in state else None
