"""Pieces the rules share: the local first pass, the output error, fixed random matrices, a rule-owned RNG, the
tangent projection.

Each rule module states its own equations and uses only what they need. DirectProjection is the one mechanism DFA and
DRTP share (they differ only in the signal they project), so it lives here rather than in either rule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..models import Block, Net, as_net, is_mlp, submodules
from .base import Rule, StepOutput, check_batch


class PeerRule(Rule):
    """Rule whose `options()` are its init fields only (state fields such as B or F are not options)."""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def local_forward(model: Net, x: torch.Tensor, run_pre: Callable[[int, Block, torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """First pass with every block's input detached, so each block's graph is local to it.

    Returns (inputs, pre, outs): h_{l-1} (detached), a_l = layer_l(pre_l(h_{l-1})) and h_l = post_l(a_l) for every
    block; outs[-1] are the logits z. `run_pre(l, block, h_in)`, if given, computes pre_l(h_in) in place of the
    block's own call (a rule that needs more from those ops than their output, such as a max-pool's positions).
    """
    h = model.prepare(x)
    inputs, pre, outs = [], [], []
    for l, block in enumerate(model.blocks):
        h_in = h.detach()
        a = block.layer(block.pre(h_in) if run_pre is None else run_pre(l, block, h_in))
        h = block.post(a)
        inputs.append(h_in)
        pre.append(a)
        outs.append(h)
    return inputs, pre, outs


@contextlib.contextmanager
def out_of_place(model: Net) -> Iterator[None]:
    """Every block's `pre` and `post` modules that overwrite their input (`inplace=True`: nn.ReLU(inplace=True) and
    the like) made to return a new tensor for the duration, their flags put back afterwards.

    For rules that keep a block's pre-activation a_l apart from its activity h_l = post_l(a_l) (FTP with
    fprime=False or update_input="t" differentiates at a_l) or that must not let h_l share its graph with a_l
    (PEPITA's modulated pass detaches h_l from a_l): an in-place post returns a_l itself, overwritten, so a_l is lost
    and h_l carries a_l's graph into the next block. The same holds for a `pre` writing over the previous block's
    (detached, but storage-sharing) activity. Inside `layer` autograd keeps in-place ops exact, so those are left
    alone."""
    flipped = [m for block in model.blocks for m in submodules(block.pre, block.post)
               if getattr(m, "inplace", False) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True


def output_error(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, p = softmax(z), e = p - onehot(y)), all without a graph.

    Every rule's step calls this on a small B x classes tensor, where entering a no_grad context and building a
    tensor of -1s each cost about as much as the arithmetic (14 and 10 us of 56 at batch 64 on the 2-core CPU box):
    so z is detached instead, and the -1 is a scalar added in place by `scatter`.
    """
    logp = torch.log_softmax(z.detach(), dim=1)
    loss = F.nll_loss(logp, y)
    p = logp.exp()
    e = p.scatter(1, y.unsqueeze(1), -1.0, reduce="add")
    return loss, p, e


def tangential_rows(d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per row, d minus its component along v: d - (<d, v> / |v|^2) v, d itself where v is 0 (FTP's tangent
    projection, in its feedforward and recurrent forms).

    Computed by the kernel torch has for weight norm's backward: with w = g v / |v| per row, dL/dv = (g / |v|) (dL/dw
    - (<dL/dw, v> / |v|^2) v), which is the projection when g = |v|. One kernel, on CPU and CUDA, in which each
    row's dot product and its update run back to back while the row is in cache, in place of six ops (docs/
    ALGORITHM.md, "The tangent projection as one kernel"). It takes the norms in its accumulation type (float32 for
    half and bfloat16 rows) and g in the rows' dtype: g is the norm rounded to that dtype and the norms are that g, so
    that g / |v| is exactly 1. The norms are at least 2^-20, a power of two and so the same in every dtype, so a zero
    row comes back unchanged (a clamp of |v|^2 at 1e-12 is 0 in float16: 0 / 0).
    """
    d, v = d.contiguous(), v.contiguous()  # the kernel reads both as plain rows
    acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    g = torch.linalg.vector_norm(v, dim=1, keepdim=True, dtype=acc).clamp_min_(2 ** -20).to(v.dtype)
    return torch.ops.aten._weight_norm_interface_backward(d, v, g, g.to(acc), 0)[0]


def one_hot(y: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, n).to(dtype=like.dtype)


def glorot_uniform(rows: int, cols: int, scale: float, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """scale * U(-a, a), a = sqrt(6 / (rows + cols)): Glorot/Xavier uniform, the standard init of such a weight."""
    return glorot_like((rows, cols), scale, gen, like)


def glorot_like(shape: tuple[int, ...], scale: float, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Glorot uniform for a weight of `shape` (out, in, *kernel): a = sqrt(6 / (fan_in + fan_out)), where the fans
    count the kernel's receptive field, as nn.init.xavier_uniform_ does; for a matrix it is glorot_uniform."""
    receptive = math.prod(shape[2:])
    limit = scale * math.sqrt(6.0 / ((shape[0] + shape[1]) * receptive))
    m = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * limit
    return m.to(device=like.device, dtype=like.dtype)


def num_features(t: torch.Tensor) -> int:
    """Size of one sample of a batch tensor (feature maps count all of C x H x W)."""
    return t[0].numel()


def out_features(model: Net) -> int:
    """Number of classes: the output block's width."""
    n = getattr(model.blocks[-1].layer, "out_features", None)
    if n is None:
        raise ValueError("this rule needs an output block whose layer has `out_features` (e.g. nn.Linear)")
    return int(n)


def fill_missing_grads(model: Net) -> None:
    """Zeros for any trainable parameter the rule does not train, so optimizers and checks see a gradient everywhere.
    A frozen parameter (requires_grad False) keeps no gradient, as under autograd."""
    for p in model.parameters():
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)


def local_backward(roots: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """torch.autograd.backward over the roots that have a graph. Every rule's blocks run on detached inputs, so a
    block whose parameters are all frozen (requires_grad False) has none and gets no gradient, as it would under BP;
    passed to autograd, its output would make the whole call fail."""
    pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
    if pairs:
        torch.autograd.backward(*zip(*pairs))


def require_mlp(model: Net, rule: str) -> None:
    """Rules defined for fully connected nets only (DTP's learned linear inverses, FF's label embedding)."""
    if not is_mlp(model):
        raise ValueError(f"{rule} supports MLPs only: blocks of one nn.Linear followed by activations or a "
                         f"LayerNorm without affine parameters (elementwise_affine=False); no convolutions, pooling, "
                         f"residual blocks, batch norm, dropout or affine LayerNorm")


def need_hidden(model: Net, rule: str) -> None:
    if len(model.blocks) < 2:
        raise ValueError(f"{rule} needs at least one hidden block before the output block")


def begin_step(model: Net, x: torch.Tensor, y: torch.Tensor, rule: str, mlp_only: bool = False) -> Net:
    """What every rule's step does first: check the batch, accept an nn.Sequential, check the model has a hidden
    block (and is an MLP, for rules defined only there), and clear the gradients the step will fill."""
    check_batch(model, x, y)
    model = as_net(model)
    if mlp_only:
        require_mlp(model, rule)
    need_hidden(model, rule)
    model.zero_grad(set_to_none=True)
    return model


def fit_matrices(name: str, mats: list[torch.Tensor], shapes: list[tuple[int, ...]],
                 like: torch.Tensor) -> list[torch.Tensor]:
    """The stored matrices on `like`'s device and dtype (a no-op when they already are).

    A loaded or stored matrix that does not fit the model is an error, not something to redraw silently.
    """
    got = [tuple(m.shape) for m in mats]
    if got != [tuple(s) for s in shapes]:
        raise ValueError(f"{name}: stored matrices have shapes {got} but the model needs {shapes}")
    return [m.to(device=like.device, dtype=like.dtype) for m in mats]


class RuleRNG:
    """A generator owned by a rule, seeded with the rule's seed, for per-step randomness (noise, negative labels).

    It is created on the data's device at first use, so drawing never crosses devices and never disturbs the global
    RNG (model init, dropout, batch order). Its state is part of the rule's state_dict, so a resumed run draws the
    same numbers. A state saved on another device type cannot be restored there; the stream then restarts from
    the seed with a warning.
    """

    def __init__(self, seed: int, offset: int = 0) -> None:
        self.seed = seed + offset
        self.gen: torch.Generator | None = None
        self.pending: dict[str, Any] | None = None
        self.shard = (0, 1)  # (rank, world size) in data-parallel training; set by ftprop.distributed.shard_rule

    def get(self, device: torch.device) -> torch.Generator:
        if self.gen is None or self.gen.device.type != device.type:
            self.gen = torch.Generator(device=device).manual_seed(self.seed)
            if self.pending is not None:
                if self.pending["device"] == device.type:
                    self.gen.set_state(self.pending["state"])
                else:
                    warnings.warn(f"rule RNG state was saved on {self.pending['device']}, running on {device.type}: "
                                  f"restarting its stream from the seed", stacklevel=3)
                self.pending = None
        return self.gen

    def draw(self, fn: Callable[..., torch.Tensor], shape: tuple[int, ...], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Per-sample random numbers for a batch of `shape` (samples first): `fn(*args, size=..., generator=...,
        **kwargs)`, e.g. torch.randn or torch.randint.

        In data-parallel training every rank draws the numbers of the whole global batch and keeps its own slice,
        so each sample gets what it would get in one process and every rank's stream stays in step.
        """
        rank, world = self.shard
        device = kwargs.get("device") or torch.device("cpu")
        full = fn(*args, size=(shape[0] * world, *shape[1:]), generator=self.get(torch.device(device)), **kwargs)
        return full[rank * shape[0]:(rank + 1) * shape[0]]

    def state_dict(self) -> dict[str, Any]:
        if self.gen is not None:
            return {"state": self.gen.get_state(), "device": self.gen.device.type}
        return dict(self.pending) if self.pending is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.gen = None
        self.pending = {"state": state["state"].clone(), "device": state["device"]} if state else None


class FixedMatrices:
    """Checkpointing for rules whose only state is `B`, their list of fixed random matrices (FA, DFA, DRTP)."""

    name: str
    B: list[torch.Tensor] | None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.B is None else {"B": list(self.B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ("B",))
        self.B = [b.clone() for b in state["B"]] if "B" in state else None


@dataclass
class DirectProjection(FixedMatrices, PeerRule):
    """DFA and DRTP: a fixed random matrix B_l (n_out x |h_l|) per hidden block carries an output-space signal
    straight to that block's output; subclasses say which signal (`_hidden_signal`)."""

    b_scale: float = 1.0   # multiplier on the Glorot-uniform range of each B_l
    seed: int = 0          # seeds the B_l, independently of the model's initialisation
    B: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # one per hidden block

    def __post_init__(self) -> None:
        self.check_options(positive=("b_scale",))

    def _hidden_signal(self, e: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The (batch x n_out) signal that B_l projects onto every hidden block, before the 1/B of the mean."""
        raise NotImplementedError

    def _matrices(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        n_out = num_features(outs[-1])
        shapes = [(n_out, num_features(h)) for h in outs[:-1]]
        if self.B is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.B = [glorot_uniform(o, n, self.b_scale, gen, outs[-1]) for o, n in shapes]
        self.B = fit_matrices(f"{self.name}: B", self.B, shapes, outs[-1])
        return self.B

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = begin_step(model, x, y, self.name)
        _, _, outs = local_forward(model, x)
        z = outs[-1]
        loss, _, e = output_error(z, y)
        batch = x.shape[0]
        signal = self._hidden_signal(e, y, z) / batch
        grads = [(signal @ b).view_as(h) for b, h in zip(self._matrices(outs), outs[:-1])]
        local_backward(outs, [*grads, e / batch])
        return StepOutput(loss, z.detach())
