"""How close a rule's update is to backpropagation's, layer by layer.

The rule has just filled `.grad`; we compute the exact BP gradient on the same
batch with `torch.autograd.grad` (leaving `.grad` alone) and report, per block,
the cosine and angle between the two updates of all the block's parameters.
The extra forward and backward must not change the run: the global RNG (dropout)
and every buffer (batch-norm running statistics) are restored afterwards.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .models import Net, as_net


def rng_state(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The RNG states that dropout draws from on `device`."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda" else None)


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def alignment(model: Net, x: torch.Tensor, y: torch.Tensor,
              rng_before_step: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None) -> list[dict[str, Any]]:
    """Per block with parameters: {"block", "cosine", "angle_deg"} between p.grad (the rule's) and BP's gradient; both
    None where the rule's update of the block is zero (FF's output block, FTP's deeper blocks with deep_weight 0): a
    zero update has no direction, and its cosine of 0 read as an update at 90 degrees to BP's.

    `rng_before_step` (from rng_state, taken before the rule's step) makes BP's forward draw the same dropout masks
    as the rule's first pass, so both gradients belong to the same network.
    """
    model = as_net(model)
    after = rng_state(x.device)
    buffers = [b.clone() for b in model.buffers()]
    params = [p for p in model.parameters() if p.requires_grad]
    if rng_before_step is not None:
        _set_rng_state(rng_before_step)
    with torch.enable_grad():
        bp = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
    for saved, b in zip(buffers, model.buffers()):
        b.copy_(saved)
    _set_rng_state(after)

    exact = {id(p): g for p, g in zip(params, bp)}
    rows = []
    for i, block in enumerate(model.blocks):
        pairs = [(p.grad, exact[id(p)]) for p in block.parameters() if id(p) in exact]
        pairs = [(r.flatten(), b.flatten()) for r, b in pairs if r is not None and b is not None]
        if not pairs:
            continue
        rule_g = torch.cat([r for r, _ in pairs]).double()  # float32 sums over ~1M terms drift by ~1e-5
        if not rule_g.any():
            rows.append({"block": i, "cosine": None, "angle_deg": None})
            continue
        bp_g = torch.cat([b for _, b in pairs]).double()
        cos = float(F.cosine_similarity(rule_g, bp_g, dim=0, eps=1e-30))
        rows.append({"block": i, "cosine": cos, "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos))))})
    return rows
