"""Backpropagation through time: the exact gradient of the sequence loss, by reverse-mode autodiff over the unrolled
recurrence. The reference the recurrent rules are judged against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..recurrent import RecurrentNet
from ._recurrent import RecurrentRule, sequence_loss
from .base import StepOutput


@dataclass
class BPTT(RecurrentRule):
    """grad = d loss(model(x), y) / d theta; loss is CE for class targets, MSE for float targets."""

    name = "bptt"

    def step(self, model: RecurrentNet, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        self.begin(model, x, y)
        z = model(x)
        loss = sequence_loss(z, y)
        loss.backward()
        return StepOutput(loss.detach(), z.detach())
