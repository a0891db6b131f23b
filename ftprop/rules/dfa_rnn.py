"""Direct feedback alignment through time (Nokland 2016, applied to every time step of an unrolled recurrent net).

With h^l_t = cell_l(h^{l-1}_t, h^l_{t-1}), z = V h^L_T + c, output error e (p - y for cross-entropy, z - y for MSE)
and batch size B:

    hidden, every layer l and step t:  delta^l_t = e B_l / B     (B_l: outputs x H_l, fixed random)
    update of cell l:                   grad theta_l = sum_t (d cell_l(h^{l-1}_t, h^l_{t-1}) / d theta_l)^T delta^l_t
    readout:                            the exact gradient of the loss (it sees only h^L_T)

The cell's inputs are detached at every step (`local_unroll`), so delta^l_t reaches cell l's parameters through
that one step only: nothing travels backward in time or down the stack. Every step of a layer gets the same feedback
e B_l; what differs between steps is the cell's own local derivative (its gates and tanh at that step) and its input.
B_l ~ b_scale * Glorot uniform, drawn on the first step from a generator seeded with `seed`, kept in state_dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..recurrent import RecurrentNet
from ._common import FixedMatrices, fit_matrices, glorot_uniform, local_backward
from ._recurrent import RecurrentRule, local_unroll, sequence_error
from .base import StepOutput


@dataclass
class DFAThroughTime(FixedMatrices, RecurrentRule):
    """DFA through time; options: b_scale, seed."""

    name = "dfa"
    b_scale: float = 1.0
    seed: int = 0
    B: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_options(positive=("b_scale",))

    def _matrices(self, model: RecurrentNet, like: torch.Tensor) -> list[torch.Tensor]:
        shapes = [(model.readout.out_features, cell.hidden_size) for cell in model.cells]
        if self.B is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.B = [glorot_uniform(o, n, self.b_scale, gen, like) for o, n in shapes]
        self.B = fit_matrices("dfa: B", self.B, shapes, like)
        return self.B

    def step(self, model: RecurrentNet, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        self.begin(model, x, y)
        states, z = local_unroll(model, x)
        err = sequence_error(z, y)
        feedback = [err.e @ b / x.shape[0] for b in self._matrices(model, z)]
        roots = [h for layer in states for h in layer] + [z]
        seeds = [feedback[l] for l, layer in enumerate(states) for _ in layer] + [err.dz]
        local_backward(roots, seeds)
        return StepOutput(err.loss, z.detach())
