"""Pieces the recurrent rules share: the output error of a sequence task and the unroll with local graphs.

Recurrent rules take a `ftprop.recurrent.RecurrentNet`, inputs x (B, T, d_in) and targets y that say the task:
int64 class indices (B,) for classification (cross-entropy), float (B, outputs) for regression (mean squared error
over every output; for forecasting, `logits` then carry the predictions). Like the feed-forward rules they fill
`.grad` of every parameter and an ordinary torch.optim optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..recurrent import RecurrentNet, check_sequence
from ._common import PeerRule
from .base import check_grad_mode


@dataclass
class SequenceError:
    """loss: the batch loss (CE or MSE, detached); dz: its gradient with respect to the outputs z;
    e: the per-sample output error that feedback rules project (p - y for CE, z - y for MSE)."""

    loss: torch.Tensor
    dz: torch.Tensor
    e: torch.Tensor


def check_sequence_batch(model: RecurrentNet, x: torch.Tensor, y: torch.Tensor, rule: str) -> None:
    check_grad_mode()
    if not isinstance(model, RecurrentNet):
        raise ValueError(f"{rule} trains ftprop.recurrent.RecurrentNet models, got {type(model).__name__}")
    check_sequence(x, model.input_size)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch size mismatch: x has {x.shape[0]} sequences, y has {y.shape[0]}")
    if y.dtype != torch.int64 and not y.is_floating_point():
        raise ValueError(f"targets must be int64 classes or float values, got {y.dtype}")
    if y.dtype == torch.int64 and y.dim() != 1:  # (batch, 1) would broadcast in the error and fail in a gather
        raise ValueError(f"class targets must have shape (batch,), got {tuple(y.shape)}")
    if y.is_floating_point() and tuple(y.shape) != (x.shape[0], model.readout.out_features):
        raise ValueError(f"regression targets must have shape (batch, {model.readout.out_features}), "
                         f"got {tuple(y.shape)}")


@torch.no_grad()
def sequence_error(z: torch.Tensor, y: torch.Tensor) -> SequenceError:
    """CE for int64 targets, MSE (mean over batch and outputs) for float targets, taken in the outputs' dtype: float64
    targets for a float32 net, which BPTT's loss promotes, would otherwise make float64 errors that fail in the
    rules' float32 matmuls."""
    if y.dtype == torch.int64:
        logp = torch.log_softmax(z, dim=1)
        e = logp.exp().scatter_add(1, y.unsqueeze(1), torch.full_like(z[:, :1], -1.0))  # p - onehot(y)
        return SequenceError(F.nll_loss(logp, y), e / z.shape[0], e)
    e = z - y.to(z.dtype)
    return SequenceError(e.square().mean(), e * (2.0 / e.numel()), e)


def sequence_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same loss with a graph (for BPTT and for checking rules against autograd)."""
    return F.cross_entropy(z, y) if y.dtype == torch.int64 else F.mse_loss(z, y)


def local_unroll(model: RecurrentNet, x: torch.Tensor) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """The first pass with every cell call's inputs detached: states[l][t] = cell_l(h^{l-1}_t, h^l_{t-1}) with a graph
    that reaches only cell l's parameters at that one step, so no gradient can travel back in time or down a layer.
    Returns (states, z); z's graph reaches only the readout."""
    x, offset = model.inputs(x)
    hidden = model.initial_states(x)
    states: list[list[torch.Tensor]] = [[] for _ in model.cells]
    for t in range(x.shape[1]):
        below = x[:, t]
        for l, cell in enumerate(model.cells):
            h = cell(below.detach(), hidden[l].detach())
            states[l].append(h)
            hidden[l] = below = h
    return states, model.output(hidden[-1].detach(), offset)


class RecurrentRule(PeerRule):
    """Base of the recurrent rules: options() lists init fields only (fixed matrices are state, not options)."""

    def begin(self, model: RecurrentNet, x: torch.Tensor, y: torch.Tensor) -> None:
        check_sequence_batch(model, x, y, self.name)
        model.zero_grad(set_to_none=True)
