"""Direct Random Target Projection (Frenkel, Lefebvre, Bol, "Learning Without Feedback: Fixed Random Learning Signals
Allow for Feedforward Training of Deep Neural Networks", Frontiers in Neuroscience 15:629892, 2021).

Like DFA, but what is projected to the hidden layers is the one-hot label alone, not the error: the hidden layers
need neither the output nor a backward pass, so they can update as soon as their forward pass is done. With blocks
h_l = f_l(a_l), a_l = W_l h_{l-1} + b_l, h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B:

    hidden:        d_l = -(y B_l) * f_l'(a_l),  l = 1 .. L-1            (B_l: n_out x |h_l|, fixed random)
    output:        d_L = e = p - y
    updates:       grad W_l = d_l^T h_{l-1} / B,  grad b_l = sum_batch d_l / B

Sign convention: with d_l = -(y B_l) f', gradient descent moves h_l toward +y B_l, the projected label (the paper's
target y* projected by B_l). Since B_l is symmetric in distribution, the opposite sign is the same rule with -B_l.

B_l ~ b_scale * U(-a, a), a = sqrt(6 / (n_out + |h_l|)) (Glorot uniform), drawn once on the first step from its own
generator seeded with `seed`; it lives in state_dict. The hidden signal never involves W_L or the output: perturbing
the output layer leaves every hidden gradient unchanged.

Convolutional and residual blocks: |h_l| is the block's whole output (C x H x W for a conv map), B_l projects onto it
flattened, and -(y B_l) / B enters the block's output, so autograd through the block's own graph (post, normalisation,
conv; both convs and the shortcut of a residual block) turns it into every parameter gradient of the block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import Net, as_net
from ._common import (PeerRule, fit_matrices, glorot_uniform, local_forward, need_hidden, num_features, one_hot,
                      output_error)
from .base import StepOutput, check_batch


@dataclass
class DRTP(PeerRule):
    """Direct random target projection; options: the scale of the projection matrices and their seed."""

    name = "drtp"
    b_scale: float = 1.0   # multiplier on the Glorot-uniform range of each B_l
    seed: int = 0          # seeds the B_l, independently of the model's initialisation
    B: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # one per hidden block

    def __post_init__(self) -> None:
        if not self.b_scale > 0:
            raise ValueError(f"drtp: b_scale must be > 0, got {self.b_scale}")

    def _projection(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        n_out = num_features(outs[-1])
        shapes = [(n_out, num_features(h)) for h in outs[:-1]]
        if self.B is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.B = [glorot_uniform(o, n, self.b_scale, gen, outs[-1]) for o, n in shapes]
        self.B = fit_matrices("drtp: B", self.B, shapes, outs[-1])
        return self.B

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        check_batch(model, x, y)
        model = as_net(model)
        need_hidden(model, "drtp")
        model.zero_grad(set_to_none=True)
        _, _, outs = local_forward(model, x)
        z = outs[-1]
        loss, _, e = output_error(z, y)
        batch = x.shape[0]
        target = one_hot(y, num_features(z), z).div_(-batch)          # -y / B
        grads = [(target @ b).view_as(h) for b, h in zip(self._projection(outs), outs[:-1])]
        torch.autograd.backward(outs, [*grads, e / batch])
        return StepOutput(loss, z.detach())

    def state_dict(self) -> dict[str, Any]:
        return {} if self.B is None else {"B": list(self.B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"B"}
        if unknown:
            raise ValueError(f"drtp: unknown state keys {sorted(unknown)}")
        self.B = [b.clone() for b in state["B"]] if "B" in state else None
