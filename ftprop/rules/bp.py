"""Backpropagation: the exact gradient by reverse-mode autodiff, the reference every rule is judged against."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import Net
from .base import Rule, StepOutput, check_batch


@dataclass
class BP(Rule):
    """grad = d CE(model(x), y) / d theta, mean over the batch."""

    name = "bp"

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        check_batch(model, x, y)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return StepOutput(loss.detach(), logits.detach())
