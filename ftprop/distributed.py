"""Data-parallel training on torch.distributed: every rank runs the same rule on its shard of each global batch.

    torchrun --nproc_per_node=2 -m ftprop train --rule ftp --batch-size 256 ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init` joins the process group (gloo on CPU,
NCCL on CUDA, one GPU per local rank). No DistributedDataParallel: a rule is not a backward pass DDP could hook into,
and it fills `.grad` however its definition says, so the synchronisation is explicit and happens after `rule.step`.

Every rank keeps an identical copy of the run instead of repairing drift:

- the same seed gives every rank the same model init, the same rule matrices (FTP's G, FA's and DFA/DRTP's B,
  PEPITA's F: drawn from the rule's own seeded generator) and the same batch order; `broadcast_model` and
  `broadcast_rule` then copy rank 0's model and rule state to the others, so machines whose kernels round
  differently still start from one state;
- `shard` gives each rank a contiguous, equal slice of every global batch;
- `average` all-reduces, after `rule.step` and before `optimizer.step`, in one flat bucket per dtype: every
  parameter's `.grad`, the tensors the rule trains itself (`Rule.learned_state`: DTP's inverses), the model's
  floating buffers (batch-norm running statistics) and the loss. The optimizer then applies the same update on
  every rank, and the rule's generators (RuleRNG) advance alike because every shard has the same size;
- per-sample random numbers a rule draws during a step (FF's wrong labels, DTP's reconstruction noise) are drawn
  for the whole global batch on every rank, each rank keeping its slice (`RuleRNG.draw`), so each sample gets the
  numbers it would get in one process.

Every rule here fills `.grad` with a mean over the batch of per-sample terms, so the mean over W ranks of equal
shards' means is the global batch's mean: BP, FTP (its tangent projection is per sample), FA, DFA, DRTP, PEPITA,
DTP (inverses averaged after their own SGD step, which is linear in their gradient) and FF (its normalisation is per
sample) give the one-process result up to float rounding. Not equal, because they use the batch itself: batch norm
(statistics of the shard; running statistics are averaged so ranks agree), dropout (masks come from the global RNG,
which every rank seeds alike, so ranks draw the same masks for their shards) and --quant (per-tensor scales of
activations and errors are taken per shard; stochastic rounding draws per shard). Weights stay identical across
ranks in all these cases. docs/SCALING.md has the full table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .rules import Rule
from .rules._common import RuleRNG


@dataclass(frozen=True)
class Context:
    """This process's place in the run; rank 0 of world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes the run's files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether torchrun (or anything setting WORLD_SIZE > 1) started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group when launched as one of several ranks; returns the context and the device to use.

    With CUDA each local rank takes its own GPU (cuda:LOCAL_RANK), unless the device names one.
    """
    if not launched():
        return Context(), device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size()), device


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def finish() -> None:
    """Leave the process group (at the end of a command, so the process exits cleanly)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_same(settings: dict[str, Any], ctx: Context, failure: str | None = None) -> None:
    """Raise on every rank, naming the settings and ranks, unless every rank was given the same `settings`; first,
    raise on every rank (as ValueError) the `failure` of the lowest rank that has one.

    Each rank parses its own command line (and --config file), and nothing else would notice ranks that differ: the
    start-up broadcast makes their models agree, and then another seed shuffles another batch order, another lr or
    rule steps otherwise, so the run silently averages unrelated updates; another batch size sends buckets of other
    sizes and fails deep inside gloo or NCCL, or hangs. One gather of the settings at start-up, before anything else.

    `failure` is what a start-up check that one rank alone makes found wrong (rank 0 alone writes --out, so only its
    answer counts). Raised on that rank alone, it would leave the others waiting in a collective it never joins, to
    fail in gloo with a traceback; given in the same gather, it stops every rank with its one-line message.
    """
    if not ctx.active:
        if failure:
            raise ValueError(failure)
        return
    gathered: list[tuple[dict[str, Any], str | None] | None] = [None] * ctx.world
    dist.all_gather_object(gathered, (settings, failure))
    failures = [theirs for _, theirs in gathered if theirs]
    if failures:
        raise ValueError(failures[0])
    first = gathered[0][0]
    differ = [f"{key}: rank 0 {first.get(key)!r}, rank {r} {theirs.get(key)!r}"
              for r, (theirs, _) in enumerate(gathered) for key in sorted(first.keys() | theirs.keys())
              if theirs.get(key) != first.get(key)]
    if differ:
        raise ValueError(f"the {ctx.world} processes were started with different settings ({'; '.join(differ)}); "
                         f"give every rank the same command, --config file and --resume")


def check_batch_size(batch_size: int, ctx: Context) -> None:
    if batch_size % ctx.world:
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by the number of "
                         f"processes ({ctx.world}), so that every rank gets an equal shard")


def shard(idx: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of indices.

    Shards are always equal: a final short batch is cut to a multiple of the world size (at most world - 1 samples
    of an epoch are left out, different ones each epoch as the order is reshuffled), because equal shards are what
    makes the average of the ranks' means the global mean and keeps the ranks' generators in step.
    """
    if not ctx.active:
        return idx
    per = len(idx) // ctx.world
    return idx[ctx.rank * per:(ctx.rank + 1) * per]


def _comm_device(like: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else like


@torch.no_grad()
def _all_reduce_mean(tensors: list[torch.Tensor], ctx: Context) -> None:
    """Average `tensors` across ranks in place, one flat bucket per dtype: a handful of collectives per step
    instead of one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(ctx.world)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def average_grads(params: list[torch.Tensor], ctx: Context) -> None:
    """Average the gradients of `params` across ranks (the pipelined FTP step calls it per block)."""
    if ctx.active:
        _all_reduce_mean([p.grad for p in params if p.grad is not None], ctx)


def average(model: torch.nn.Module, rule: Rule, loss: torch.Tensor, ctx: Context, grads: bool = True) -> torch.Tensor:
    """After `rule.step`: average gradients (unless already done per block), the rule's learned state, floating
    buffers and the loss across ranks; returns the global batch's loss. A no-op returning `loss` for one process."""
    if not ctx.active:
        return loss
    loss = loss.detach().clone().reshape(1)
    tensors = [p.grad for p in model.parameters() if p.grad is not None] if grads else []
    tensors += rule.learned_state() + [b for b in model.buffers() if b.is_floating_point()] + [loss]
    _all_reduce_mean(tensors, ctx)
    return loss[0]


def _broadcast_tree(obj: Any, ctx: Context) -> Any:
    """`obj` (nested dicts/lists of tensors and plain values, the same structure on every rank) with every tensor
    replaced by rank 0's; tensors keep their device."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to(_comm_device(obj.device)).clone()
        dist.broadcast(t, src=0)
        return t.to(obj.device)
    if isinstance(obj, dict):
        return {k: _broadcast_tree(v, ctx) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_broadcast_tree(v, ctx) for v in obj)
    return obj


@torch.no_grad()
def broadcast_model(model: torch.nn.Module, ctx: Context) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if ctx.active:
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(_broadcast_tree(t, ctx))


def broadcast_rule(rule: Rule, ctx: Context) -> None:
    """Copy rank 0's rule state (random matrices, DTP's inverses, generator states) to every rank.

    Rules create their state lazily, at the first step, so the training loop calls this right after it.
    """
    if ctx.active:
        rule.load_state_dict(_broadcast_tree(rule.state_dict(), ctx))


def shard_rule(rule: Rule, ctx: Context) -> None:
    """Tell the rule's generators this rank's place, so per-sample draws are the global batch's (RuleRNG.draw)."""
    for value in vars(rule).values():
        if isinstance(value, RuleRNG):
            value.shard = (ctx.rank, ctx.world)


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def all_sum(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum of a tensor over ranks (the epoch's correct-prediction count); `value` itself for one process."""
    if not ctx.active:
        return value
    total = value.detach().to(_comm_device(value.device)).clone()
    dist.all_reduce(total)
    return total.to(value.device)
