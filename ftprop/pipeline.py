"""Layer pipelining for FTP: update each block as soon as its target exists, while the next targets are computed.

FTP has no backward pass: block l's error needs only its first-pass output h_l and its target t_l, and the second
pass computes t_{l+1} = block_{l+1}(t_l) with block l+1's weights, never block l's again. So block l can be updated
the moment t_l exists, which is the paper's partial relief of update locking. `FTP(pipeline=True)` calls
`rule.block_ready(l)` as soon as block l's gradients are final; `wire` points that at a step of block l's own
parameter group. Every optimizer here updates each parameter from its own gradient and state only, so the
pipelined update equals the one after the step (tests/test_pipeline.py checks it bit for bit).

In one process the work is the same, only reordered, so it cannot be faster unless something runs concurrently;
docs/SCALING.md has the measurement.
"""
from __future__ import annotations

from typing import Callable

import torch

from .models import Net, as_net
from .rules import Rule


def enabled(rule: Rule) -> bool:
    return bool(getattr(rule, "pipeline", False))


def param_groups(model: Net) -> list[dict[str, list[torch.nn.Parameter]]]:
    """One optimizer parameter group per block with parameters, in block order."""
    model = as_net(model)
    groups = [{"params": list(block.parameters())} for block in model.blocks]
    if sum(len(g["params"]) for g in groups) != len(list(model.parameters())):
        raise ValueError("pipeline: every parameter must belong to a block")
    return [g for g in groups if g["params"]]


def step_group(opt: torch.optim.Optimizer, index: int) -> None:
    """optimizer.step() on one parameter group only.

    torch optimizers step all their groups; showing the optimizer that group alone keeps one optimizer (one state,
    one scheduler, one checkpoint) for the whole model, and its state is per parameter, so nothing else changes.
    """
    groups = opt.param_groups
    opt.param_groups = [groups[index]]
    try:
        opt.step()
    finally:
        opt.param_groups = groups


def wire(rule: Rule, model: Net, opt: torch.optim.Optimizer,
         before_step: Callable[[list[torch.Tensor]], None] | None = None) -> None:
    """Make the rule's `block_ready(l)` step block l's parameter group of `opt` (built from `param_groups`);
    `before_step(params)` runs first (data-parallel training averages the block's gradients there).

    `opt`'s groups must be `param_groups(model)`'s, in that order: block_ready(l) steps a group by its index, so an
    optimizer with other groups (one for all parameters, weights apart from biases) would step another block's
    parameters, on gradients of the last step or of none, or none at all. Checked here, once."""
    group_of, g = {}, 0
    for l, block in enumerate(as_net(model).blocks):
        if any(True for _ in block.parameters()):
            group_of[l], g = g, g + 1
    expected = [[id(p) for p in group["params"]] for group in param_groups(model)]
    got = [[id(p) for p in group["params"]] for group in opt.param_groups]
    if got != expected:
        raise ValueError(f"pipeline: the optimizer has {len(got)} parameter group(s) that are not the model's blocks' "
                         f"({len(expected)}, one per block with parameters, in block order); build it as "
                         f"torch.optim.SGD(ftprop.pipeline.param_groups(model), ...)")

    def block_ready(l: int) -> None:
        if l in group_of:
            if before_step is not None:
                before_step(opt.param_groups[group_of[l]]["params"])
            step_group(opt, group_of[l])

    rule.block_ready = block_ready
