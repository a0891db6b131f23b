"""Forward Target Propagation (As-Saquib et al., arXiv 2506.11030, 2025).

With blocks h_l = post_l(a_l), a_l = layer_l(pre_l(h_{l-1})), h_0 = x, z = h_L, p = softmax(z):

    output target:   t_L = p - gamma (p - y)                          (gamma_mode="step")
    first target:    t_1 = h_1 + s(G t_L) - s(G p)                     (G fixed random, s = tanh)
                     t_1 = h_1 + gamma (s(G y) - s(G p))               (gamma_mode="multiplier")
    second pass:     t_l = block_l(t_{l-1}),  l = 2 .. L-1             (the network's own forward weights)
                     t_l = block_l(t_{l-1}) + s(G_l t_L) - s(G_l p)     (inject="every": G_l fixed random per layer)
    local loss:      L_l = |h_l - t_l|^2 / (2 gamma B)  ->  d_l = (h_l - t_l) / gamma * f'(a_l)
    output layer:    dL/dz = (p - y) / B

Every block's input is detached, so each local loss reaches only its own
block's parameters: no gradient ever crosses a block. The whole update costs
one forward pass, two projections through G and a forward pass of the
target through blocks 2..L-1 on top of the per-layer weight gradients.
See docs/ALGORITHM.md for the choices and the evidence behind the defaults.

Convolutional and residual nets (docs/ALGORITHM.md, "Convolutional and
residual networks"): h_1 is the first block's whole output (for a CNN the
conv feature map C x H x W, before pooling, which lives in the next block's
`pre`); G maps to it flattened. The second pass runs blocks exactly as the
first: pooling, flatten, residual additions, normalisation, with the first
pass's dropout masks and batch-norm batch statistics (`two_pass`), so running statistics are updated once per
step. A residual block is one block: its local loss trains both its convs
(and shortcut) through the block's own graph; no gradient leaves the block.
With `inner_targets` the second pass's value of the activation between the
branch's convs is the first conv's own target, and no gradient crosses a conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Block, Net, Residual, as_net, submodules, two_pass
from ._common import begin_step, local_backward, local_forward, out_of_place, output_error, tangential_rows
from .base import Rule, StepOutput

# torch's hooks on every module (torch.nn.modules.module.register_module_forward_hook and the like)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(m: nn.Module | None = None) -> bool:
    """Whether a hook could watch or change what runs through module m (any module: torch's global hooks, when m is
    None): the step rewrites that change what a module computes or carries (`FTP._folded`, `FTP._low_rank_op`) are
    not made there."""
    if m is None:
        return any(getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS)
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def check_g_block(k: int, shape: Sequence[int]) -> None:
    """g_block = k > 1 repeats G's entries over k x k patches, so the first block's output (`shape`, one sample) must be
    a map C x H x W with H and W divisible by k. ftprop.cost checks it too, so that no cost is given for a step that
    refuses the model."""
    if k > 1 and (len(shape) != 3 or shape[1] % k or shape[2] % k):
        raise ValueError(f"ftp: g_block={k} needs the first block's output to be a map C x H x W with H and W "
                         f"divisible by {k}, got shape {tuple(shape)}")


G_DISTS = ("gaussian", "uniform", "sparse", "orthogonal")
NONLINS = ("tanh", "linear")


def inner_taps(model: Net) -> dict[int, nn.Module]:
    """Per residual block l = 2 .. L-1 (0-based 1 .. L-2), the activation between its branch's first two convs: what
    `inner_targets` taps (`_InnerTargets`). An error when such a branch has no module between those convs."""
    taps = {}
    for l, block in enumerate(model.blocks):
        if not (0 < l < len(model.blocks) - 1 and isinstance(block.layer, Residual)):
            continue
        branch = block.layer.branch
        convs = [i for i, m in enumerate(branch) if isinstance(m, nn.Conv2d)] if isinstance(branch, nn.Sequential) else []
        if len(convs) < 2 or convs[1] - 1 == convs[0]:
            raise ValueError(f"ftp: inner_targets needs an activation between the first two convs of block {l + 1}'s "
                             f"residual branch, got {branch}")
        taps[l] = branch[convs[1] - 1]
    return taps


class _InnerTargets:
    """Taps the activation between a residual branch's two convs (option `inner_targets`) for one FTP step.

    While installed, each tapped activation records its output and passes it on detached: in the first pass the
    recorded value keeps its graph to the branch's first conv, in the second pass (no graph) it is that activation's
    target. The branch's second conv and the shortcut then learn from the block's target alone and the first conv
    from its own, so no gradient crosses a conv even inside a block, and FTP skips the backward through the second
    conv that the block's local loss would take. Tapped: the residual blocks that the second pass runs through
    (blocks 2 .. L-1); the first block's output is where G projects, so it stays one block.
    """

    def __init__(self, model: Net) -> None:
        taps = inner_taps(model)
        self.records: dict[int, list[torch.Tensor]] = {l: [] for l in taps}
        self._handles = [tap.register_forward_hook(self._hook(l)) for l, tap in taps.items()]

    def _hook(self, l: int) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
            self.records[l].append(out)
            return out.detach()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _LowRankFirst:
    """Block 2's first linear op (its layer, or the first module of its residual branch) on the target path as its
    first-pass output plus the op applied to the contrast's rows, for one FTP step.

    With a linear contrast, t_1 - h_1 = -gamma B (e / B) G has rank <= K (the classes), so for a linear op L with
    bias b, L(t_1) + b = (L(h_1) + b) - gamma B (e / B) L(G): L runs on the K rows of G instead of the B samples of the
    batch (docs/ALGORITHM.md, "The second pass's first op at rank K"). While installed, the op's `forward` is replaced
    (as `two_pass` does for dropout and batch norm): the first pass runs the op and records its output; once `arm`ed,
    the op's next call returns the low-rank sum and ignores its input, which FTP has made pre_2(h_1 + delta) with
    delta = -gamma B (e / B) G; every later call runs the op again. A module called twice in the first pass (used
    twice) is never armed.
    """

    def __init__(self, op: nn.Linear | nn.Conv2d) -> None:
        self.op = op
        self.out: torch.Tensor | None = None
        self.version = 0  # the output's version counter when recorded
        self.calls = 0
        self.low_rank: tuple[torch.Tensor, torch.Tensor, float] | None = None
        op.forward = self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank is not None:
            coeffs, rows, alpha = self.low_rank
            self.low_rank = None
            linear = self.op._conv_forward(rows, self.op.weight, None) if isinstance(self.op, nn.Conv2d) \
                else F.linear(rows, self.op.weight)
            return torch.addmm(self.out.flatten(1), coeffs, linear.flatten(1), alpha=alpha).view_as(self.out)
        out = type(self.op).forward(self.op, x)
        self.calls += 1
        self.out = out.detach() if self.calls == 1 else None  # any later call: no one output to start from
        self.version = out._version
        return out

    def arm(self, coeffs: torch.Tensor, rows: torch.Tensor, alpha: float) -> None:
        """The next call returns out + alpha coeffs op(rows) (rows: the op's inputs for the K rows of G). Not when
        the recorded output was changed in place since (an in-place activation after the op), nor for a channels-last
        output, whose rows would be copies."""
        if self.out is not None and self.out._version == self.version and self.out.is_contiguous():
            self.low_rank = (coeffs, rows, alpha)

    def remove(self) -> None:
        del self.op.__dict__["forward"]


def macs_per_output(op: nn.Linear | nn.Conv2d) -> int:
    """Multiply-adds behind each value a linear op outputs: its input features, or a conv's C_in / groups x kernel."""
    return op.in_features if isinstance(op, nn.Linear) else op.in_channels // op.groups * math.prod(op.kernel_size)


def rank_k_pays(k: int, macs_per_out: int, batch: int) -> bool:
    """Whether `_LowRankFirst` does fewer multiply-adds than running the op on the batch: per output value, K rows
    through the op plus the B x K x |out| product, K (c + B), against B c. At K >= B it never does (a batch of one
    sample, as on a microcontroller, would run the op on K rows instead of one)."""
    return k * (macs_per_out + batch) < batch * macs_per_out


# Pointwise activations that can overwrite their input (their `inplace` attribute) and draw no noise, and the modules
# whose output is a new tensor that nothing but the next module reads (`FTP._in_place_activations`). Exact types: a
# subclass may return its input or a view of it.
_IN_PLACE = (nn.ReLU, nn.LeakyReLU)
_FRESH = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
          Residual)


class _InPlaceActivations:
    """The second pass's activations made to overwrite their input, for one FTP step (`FTP._in_place_activations`).

    The second pass runs without a graph, and the activation's input is a map that only it reads, so writing the
    activation's output over it gives the same values without a new map per activation (on the stem residual net, six
    ReLUs over 64 x 32 x 12 x 12 maps per step). `arm` sets their `inplace` flag once the first pass is done; `remove`
    puts back what each had.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.was = [m.inplace for m in modules]

    def arm(self) -> None:
        for m in self.modules:
            m.inplace = True

    def remove(self) -> None:
        for m, was in zip(self.modules, self.was):
            m.inplace = was


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a map is stored channels-last (N, H, W, C in memory) rather than in PyTorch's default order."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` stored in `ref`'s memory order (no copy when it already is). An error map in another order than the map it
    is paired with makes every elementwise kernel that combines them fall back to a strided loop (the ReLU backwards of
    a residual CNN's FTP step took 2.5x as long), and `_rows` would pair its values with the wrong ones of `ref`."""
    return t.contiguous(memory_format=torch.channels_last if _channels_last(ref) else torch.contiguous_format)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """One row per sample, its values in memory order: a view of a contiguous or channels-last map (per-sample sums
    do not depend on the order, and flattening a channels-last map in logical order would copy it)."""
    return t.permute(0, 2, 3, 1).flatten(1) if _channels_last(t) else t.flatten(1)


def _tangential(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per sample, the part of `delta` orthogonal to `h`, in h's memory order.

    A hidden target t_l = h_l + c is always relative to where h_l is now, so
    any part of c that does not lower the output error keeps pushing h_l,
    step after step. Saturating units (tanh) absorb that push; ReLU units
    grow without bound and the net diverges. Removing the radial component
    lets local learning rotate a representation but not inflate it, as a
    LayerNorm'd block would, without changing the network's forward function.

    The rows of both maps in h's memory order go to `tangential_rows` (one kernel: docs/ALGORITHM.md, "The tangent
    projection as one kernel").
    """
    p = tangential_rows(_rows(_like(delta, h)), _rows(h))
    if _channels_last(h):
        n, c, hh, ww = h.shape
        return p.view(n, hh, ww, c).permute(0, 3, 1, 2)
    return p.view(h.shape)


def _tangential_gap(h: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * P(h - t), `_tangential` of the scaled gap between h and its target t, in h's memory order.

    P removes each sample's component along h, so P(h) = 0 and scale * P(h - t) = -scale * P(t): the gap h - t is
    never built, one pass fewer over two maps per block and step than projecting it (the tangent projections are most
    of what FTP adds to a residual CNN's step: docs/ALGORITHM.md, "The stem residual net's step time"). scale = -1,
    the unit error of a folded loss weight (`_folded`), needs no other kernel. Equal to `_tangential((h - t) * scale,
    h)` up to rounding.
    """
    gap = _tangential(t, h)
    return gap if scale == -1 else gap.mul_(-scale)


def _scaled_gap(h: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (h - t): one kernel for the unit error of a folded loss weight (scale = -1, `_folded`)."""
    return torch.sub(t, h) if scale == -1 else (h - t).mul_(scale)


def _max_pool(pre: nn.Module) -> nn.MaxPool2d | None:
    """The max-pool that a block's input ops consist of (possibly followed by flatten), else None."""
    mods = list(pre) if isinstance(pre, nn.Sequential) else [pre]
    if mods and isinstance(mods[0], nn.MaxPool2d) and all(isinstance(m, nn.Flatten) for m in mods[1:]):
        return mods[0]
    return None


def _after_pool(pre: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """The rest of a block's input ops (a flatten, or nothing) applied to the output `u` of their max-pool (iterated:
    slicing an nn.Sequential builds a new one, which costs more than the flatten)."""
    for i, m in enumerate(pre if isinstance(pre, nn.Sequential) else ()):
        if i:
            u = m(u)
    return u


def _reshapes_only(pre: nn.Module) -> bool:
    """Whether a block's input ops only rearrange each sample's values (identity, flatten): a local loss measured
    after them is the one measured before, so compare_at="next-input" needs no Jacobian there."""
    mods = list(pre) if isinstance(pre, nn.Sequential) else [pre]
    return all(isinstance(m, nn.Identity) or (isinstance(m, nn.Flatten) and m.start_dim != 0) for m in mods)


def _pool_with_positions(pooled: dict[int, tuple[torch.Tensor, torch.Tensor]]
                         ) -> Callable[[int, Block, torch.Tensor], torch.Tensor]:
    """A first pass's `run_pre` that, where a block's input ops are a max-pool (then flatten), runs the pool with its
    indices and records (pooled map, positions) as pooled[l - 1]: the values and positions of
    h_{l-1} it passes on. The pool with indices costs what the pool alone does, so compare_at="next-input" need not
    run it again, and the pooled values need no gather."""
    def run_pre(l: int, block: Block, h: torch.Tensor) -> torch.Tensor:
        pool = _max_pool(block.pre) if l > 0 else None
        if pool is None:
            return block.pre(h)
        u, idx = F.max_pool2d(h, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                              return_indices=True)
        pooled[l - 1] = (u.detach(), idx)
        return _after_pool(block.pre, u)
    return run_pre


def _windows(pool: nn.MaxPool2d | None) -> int | None:
    """k when the pool's windows are the k x k patches that tile its input (kernel = stride = k, no padding, no
    dilation), else None."""
    if pool is None:
        return None
    k, stride, pad, dil = (v if isinstance(v, tuple) else (v, v) for v in
                           (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation))
    return k[0] if k[0] == k[1] and stride == k and pad == (0, 0) and dil == (1, 1) else None


# g * f'(a) written in terms of h = f(a), for the activations where that is possible: the fused kernels autograd
# itself uses for these activations' backward.
_THROUGH_ACTIVATION: dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Identity: lambda m, g, h: g,
    nn.Tanh: lambda m, g, h: torch.ops.aten.tanh_backward(g, h),
    nn.Sigmoid: lambda m, g, h: torch.ops.aten.sigmoid_backward(g, h),
    nn.ReLU: lambda m, g, h: torch.ops.aten.threshold_backward(g, h, 0),
    nn.LeakyReLU: lambda m, g, h: torch.ops.aten.leaky_relu_backward(g, h, m.negative_slope, True),
}


def _activation(block: Block) -> tuple[Callable, nn.Module] | None:
    """(fn, act) with fn(act, g, h) = g * f'(a) in terms of h = f(a), when block's post is at most one pointwise
    activation of `_THROUGH_ACTIVATION` and no hook on the block's modules could watch or change h or its error; else
    None. Read without ModuleList/Sequential indexing, as it runs every step (`_closed_form_derivatives`)."""
    parts = block._modules  # read once: each attribute lookup on a module costs about 1 us
    post = act = parts["post"]
    if isinstance(post, nn.Sequential):
        inner = list(post)
        if len(inner) > 1:
            return None
        act = inner[0] if inner else nn.Identity()
    fn = _THROUGH_ACTIVATION.get(type(act))
    if fn is None or (type(act) is nn.LeakyReLU and act.negative_slope < 0):  # h = f(a) then no longer tells a's
        return None                                           # sign (and torch's kernel refuses such a slope from h)
    if _hooked(block) or _hooked(parts["pre"]) or _hooked(parts["layer"]) or _hooked(post) or _hooked(act):
        return None
    return fn, act


def _closed_form_derivatives(blocks: list[Block]) -> list[tuple[Callable, nn.Module]] | None:
    """Per block, (fn, post) with fn(post, g, h) = g * f'(a), when every block is a plain Linear layer followed by at
    most one pointwise activation; else None and FTP differentiates each block's local loss with autograd (conv,
    norms, dropout, residuals, hooked blocks...). Both give the same gradients (tests/test_rules.py); the closed form
    just skips building graphs. Runs every step (a model may gain hooks or blocks between steps), so it avoids
    ModuleList/Sequential indexing, which alone cost more than this whole check (about 4 us a lookup on the CPU box).

    Any hook keeps autograd: a module's forward or backward hooks, torch's global module hooks, a parameter's gradient
    or post-accumulate hooks. The closed form assigns `.grad` without autograd, so none of them would run (hardware
    simulation quantizes the errors autograd carries; a user's hook may clip or log the gradients)."""
    if _hooked():
        return None
    found = []
    for block in blocks:
        parts = block._modules
        layer, derivative = parts["layer"], _activation(block)
        if derivative is None or type(layer) is not nn.Linear or not isinstance(parts["pre"], nn.Identity) or any(
                p._backward_hooks or p._post_accumulate_grad_hooks for p in layer._parameters.values() if p is not None):
            return None
        found.append(derivative)
    return found


@dataclass(frozen=True)
class StepPath:
    """The parts of an FTP step on a given model that change how many multiply-adds it does (`FTP.step_path`)."""

    closed_form: bool            # local gradients in closed form: update_input="t" runs no layer again
    grid: bool                   # G projects onto the pooled map (`FTP._on_grid`): n_out x |pool(h_1)| MACs
    rank_k_op: str | None        # block 2's first op (its name in the model), run at rank K where `rank_k_pays`
    inner_taps: tuple[str, ...]  # inner_targets: the modules whose output a residual branch passes on detached


@dataclass
class FTP(Rule):
    """Forward Target Propagation; fields are the open choices of the formulation."""

    name = "ftp"
    gamma: float = 0.1
    gamma_mode: str = "step"          # "step": gamma moves the output target; "multiplier": gamma scales the correction
    g_dist: str = "gaussian"          # distribution of the fixed projection G
    g_scale: float = 0.1              # standard deviation of G's entries (chosen by measurement, docs/ALGORITHM.md)
    g_density: float = 0.1            # g_dist="sparse": fraction of G's entries that are nonzero
    target_nonlin: str = "linear"     # s in s(G t_L) - s(G p); "tanh" is within 0.4% of linear at g_scale 0.1
    fprime: bool = True               # multiply the local error by f'(a_l) (the local loss's exact gradient)
    update_input: str = "h"           # "h": grad W_l uses h_{l-1} (first pass); "t": uses t_{l-1} (second pass)
    tangent: bool = True              # drop the radial part of h_l - t_l (keeps ReLU nets bounded; see docs)
    seed: int = 0                     # seeds G, independently of the model's initialisation
    pipeline: bool = False            # fill each block's gradients as soon as its target exists, then block_ready(l)
    compare_at: str = "output"        # "output": local loss on h_l; "next-input": on pre_{l+1}(h_l) (after pooling)
    deep_weight: float = 1.0          # weight of hidden blocks 2..L-1's local losses against the first's (see docs)
    inner_targets: bool = False       # residual blocks: each conv learns from its own target, not the block's (docs)
    g_block: int = 1                  # conv maps: G's entries are equal over k x k patches (k = the pool's size: docs)
    inject: str = "first"             # "every": each deeper hidden block's target also gets its own projection (docs)
    G: torch.Tensor | None = field(default=None, init=False, repr=False)
    G_deep: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # inject="every": blocks 2..L-1

    def __post_init__(self) -> None:
        self.check_options(positive=("gamma", "g_scale"), choices={
            "gamma_mode": ("step", "multiplier"), "g_dist": G_DISTS, "target_nonlin": NONLINS, "update_input": ("h", "t"),
            "compare_at": ("output", "next-input"), "inject": ("first", "every")}, nonnegative=("deep_weight",))
        if not 0 < self.g_density <= 1:
            raise ValueError(f"ftp: g_density must be in (0, 1], got {self.g_density}")
        if not (isinstance(self.g_block, int) and self.g_block >= 1):
            raise ValueError(f"ftp: g_block must be an integer >= 1, got {self.g_block!r}")
        if self.inner_targets and (self.update_input != "h" or not self.fprime):
            raise ValueError("ftp: inner_targets needs update_input='h' and fprime=True (the first conv's local error "
                             "is taken at its activation's output, with the first pass's inputs)")
        # Set by the training loop when pipeline=True (ftprop.pipeline.wire): called with a block's index as soon as
        # its gradients are final, to update it while the next targets are computed. Not an option, not state.
        self.block_ready: Callable[[int], None] | None = None
        self._grid: tuple[torch.Tensor, torch.Tensor] | None = None  # (G, G on the pooled grid): see `_pooled_grid`

    def options(self) -> dict[str, Any]:
        opts = super().options()
        opts.pop("G")
        opts.pop("G_deep")
        return opts

    def _projection(self, n_out: int, n_hidden: int, like: torch.Tensor, gen: torch.Generator | None = None,
                    g_block: int | None = None) -> torch.Tensor:
        """G: (n_out, |h_1|), drawn once from its own generator so it does not disturb other randomness (`gen`, seeded
        by `seed` unless given: inject="every" draws the deeper blocks' projections from the same stream after G, so
        G is the same with either setting; g_block applies to the first map only).

        With g_block = k > 1 the first block's output must be a map C x H x W with H and W divisible by k: G is drawn
        for the C x H/k x W/k grid and each entry repeated over its k x k patch, so every position of a patch is asked
        for the same change. With k the next max-pool's size and compare_at="next-input", whichever position of a
        window the pool passes on receives the same request, so G acts as one fixed projection onto the pooled map,
        the map the next layer reads (docs/ALGORITHM.md, "G's scale on a conv map").
        """
        k = self.g_block if g_block is None else g_block
        if k > 1:
            check_g_block(k, like.shape[1:])
            c, h, w = like.shape[1:]
            n_hidden = c * (h // k) * (w // k)
        gen = torch.Generator().manual_seed(self.seed) if gen is None else gen
        if self.g_dist == "gaussian":
            g = torch.randn(n_out, n_hidden, generator=gen) * self.g_scale
        elif self.g_dist == "uniform":  # uniform with the same standard deviation
            g = (torch.rand(n_out, n_hidden, generator=gen) * 2 - 1) * (self.g_scale * 3 ** 0.5)
        elif self.g_dist == "sparse":  # exactly round(density * size) gaussian entries, scaled so the std is g_scale
            size = n_out * n_hidden
            keep = torch.randperm(size, generator=gen)[:max(1, round(self.g_density * size))]
            g = torch.zeros(size)
            g[keep] = torch.randn(len(keep), generator=gen) * (self.g_scale * (size / len(keep)) ** 0.5)
            g = g.view(n_out, n_hidden)
        else:  # orthogonal: rows orthonormal (columns if n_out > n_hidden), scaled so entries have RMS g_scale
            q, r = torch.linalg.qr(torch.randn(max(n_out, n_hidden), min(n_out, n_hidden), generator=gen,
                                               dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # the Haar-distributed orthonormal frame
            g = (q.t() if n_out <= n_hidden else q).float() * (self.g_scale * max(n_out, n_hidden) ** 0.5)
        if k > 1:
            g = g.view(n_out, c, h // k, 1, w // k, 1).expand(-1, -1, -1, k, -1, k).reshape(n_out, c * h * w)
        return g.to(device=like.device, dtype=like.dtype)

    def _contrast_error(self, p: torch.Tensor, e: torch.Tensor, batch: int, G: torch.Tensor) -> torch.Tensor:
        """(h - t) / (gamma B) for the projected contrast through G: the first block's error before the tangent
        projection (G the first projection), or, with inject="every", a deeper block's nudge divided by -gamma B.

        With s linear both gamma modes reduce to t_1 - h_1 = -gamma G e, so the error is (e / B) G: one projection,
        and the scaling is done on the B x n_out output error, not on the first map (a conv map is 18,432 values per
        sample on the paper CNN, where each extra pass over it costs more than the projection itself).
        """
        if self.target_nonlin == "linear":
            return (e / batch) @ G
        first = p - self.gamma * e if self.gamma_mode == "step" else p - e  # t_L, or the one-hot label
        both = torch.tanh(torch.cat([first, p]) @ G)  # the two projections in one matmul
        s_first, s_p = both.chunk(2)
        scale = 1.0 if self.gamma_mode == "step" else self.gamma
        return (s_p - s_first).mul_(scale / (self.gamma * batch))

    def _contrast_map(self, p: torch.Tensor, e: torch.Tensor, batch: int, G: torch.Tensor, like: torch.Tensor
                      ) -> torch.Tensor:
        """`_contrast_error` shaped like the map `like` and stored in its memory order. G's columns follow the map's
        logical order (C, H, W); for a channels-last map they are permuted to (H, W, C) first, so that the product
        lands in the map's order: a copy of G (outputs x |h|) instead of one of the error (batch x |h|)."""
        if not _channels_last(like):
            return self._contrast_error(p, e, batch, G).view_as(like)
        n, c, hh, ww = like.shape
        G = G.view(-1, c, hh, ww).permute(0, 2, 3, 1).reshape(G.shape[0], -1)
        return self._contrast_error(p, e, batch, G).view(n, hh, ww, c).permute(0, 3, 1, 2)

    def _on_output(self, blocks: list[Block], l: int) -> bool:
        """Whether hidden block l's local loss is measured on h_l itself: compare_at="output", or next input ops
        that only reshape (identity, flatten), where measuring after them is the same loss."""
        return self.compare_at == "output" or _reshapes_only(blocks[l + 1].pre)

    def _gap_error(self, blocks: list[Block], l: int, h: torch.Tensor, t: torch.Tensor, scale: float,
                   pooled: dict[int, tuple[torch.Tensor, torch.Tensor]],
                   behind_pool: dict[int, tuple[Callable, nn.Module]]) -> torch.Tensor:
        """`_error` of err = scale (h_l - t_l): hidden block l's error from its target, scale being its local loss's
        weight / (gamma B), or -1 where that weight is applied to the gradients instead (`_folded`). Where the loss
        is measured on h_l itself, with the tangent projection, the gap is projected without being built
        (`_tangential_gap`)."""
        if self.tangent and self._on_output(blocks, l):
            return _tangential_gap(h, t, scale)
        return self._error(blocks, l, h, _scaled_gap(h, t, scale), pooled, behind_pool)

    def _error(self, blocks: list[Block], l: int, h: torch.Tensor, err: torch.Tensor,
               pooled: dict[int, tuple[torch.Tensor, torch.Tensor]],
               behind_pool: dict[int, tuple[Callable, nn.Module]], on_grid: bool = False) -> torch.Tensor:
        """Hidden block l's error from err = (h_l - t_l) / (gamma B): the gradient of its local loss with respect to
        h_l, P(err) with P the tangent projection when `tangent` is on.

        compare_at="next-input" measures that loss where the next layer reads h_l, after the next block's
        parameter-free input ops (pooling, flatten), linearised at h_l: |P(J (h_l - t_l))|^2 / (2 gamma B) with J the
        Jacobian of pre at h_l and P projecting against pre(h_l). Through a max-pool the error then reaches only the
        positions the pool passes on; the others cannot change the output, yet on a conv map their errors would still
        move the shared filters. (Not pre(h_l) - pre(t_l): a max over a window of h + noise exceeds the max of h on
        average, so that difference pushes every passed position up.) No parameter lies on the path, so no gradient
        crosses a layer. With a `pre` that only reshapes (identity in MLPs, flatten) both settings are the same.
        Behind a max-pool, J is a selection: `pooled[l]` holds the values and positions the first pass's pool passed
        on (`_pool_with_positions`), the error is gathered there and J^T adds it back (`on_grid`: err is already the
        pooled map's, one value per window); other input ops take J and J^T from autograd. For a block in
        `behind_pool` the error gets its activation's derivative on the pooled map, before J^T: it is then the error
        of the block's layer output a_l, not of h_l (`_behind_pool`).
        """
        if self._on_output(blocks, l):
            return _tangential(err, h.detach()) if self.tangent else err
        nxt = blocks[l + 1].pre
        if l in pooled:
            u, idx = pooled[l]
            err = err.flatten(2) if on_grid else err.flatten(2).gather(2, idx.flatten(2))  # a view in either layout
            if self.tangent:
                err = _tangential(err, u.flatten(2))  # against the pooled map
            if l in behind_pool:
                fn, act = behind_pool[l]
                err = fn(act, err, u.flatten(2))  # f'(a_l) where h_l = u
            pool = _max_pool(nxt)  # J^T: the pool's own backward (BP's kernel), each error back to its position
            return torch.ops.aten.max_pool2d_with_indices_backward(err.view(u.shape), h, pool.kernel_size, pool.stride,
                                                                   pool.padding, pool.dilation, pool.ceil_mode, idx)
        with torch.enable_grad():
            # a view, not the leaf itself: torch.utils.flop_counter's module hooks (ftprop bench, cost) make
            # autograd.grad with respect to a module's leaf input raise
            leaf = h.detach().requires_grad_().view_as(h)
            u = nxt(leaf)
            probe = torch.zeros_like(u, requires_grad=True)  # J err as the gradient of (J^T probe) . err
            (back,) = torch.autograd.grad(u, leaf, probe, create_graph=True)
            (err,) = torch.autograd.grad(back, probe, err)
        if self.tangent:
            err = _tangential(err, u.detach())
        return torch.autograd.grad(u, leaf, err)[0]

    def _behind_pool(self, blocks: list[Block], pooled: dict[int, tuple[torch.Tensor, torch.Tensor]],
                     pre: list[torch.Tensor], outs: list[torch.Tensor]) -> dict[int, tuple[Callable, nn.Module]] | None:
        """The blocks whose local error can take its activation's derivative on the pooled map: block l -> (fn, act)
        of `_activation`; None where there are none.

        Behind a max-pool whose windows tile the map (`_windows`: none overlaps), a block's error is nonzero only at
        the positions the pool passed on, and there h_l is the pooled value u. So f'(a_l) applied to the pooled error
        with u, then scattered by the pool's backward, is the map that the activation's backward over the whole h_l
        would give, bit for bit (each position receives one value or zero), at a quarter of the passes over a 2 x 2
        pool's map (on the stem residual net: over 64 x 32 x 24 x 24 values per step, docs/ALGORITHM.md, "The
        activation's derivative on the pooled map"). The error then starts autograd from the layer's output a_l. Only
        for local errors that include f' (fprime, update_input="h"), and where the activation made a new map (a_l is
        not h_l, overwritten in place), without hooks (`_activation`).
        """
        if not (pooled and self.fprime and self.update_input == "h") or _hooked():
            return None
        found = {}
        for l in pooled:
            derivative = _activation(blocks[l])
            if derivative is not None and pre[l] is not outs[l] and _windows(_max_pool(blocks[l + 1].pre)) is not None:
                found[l] = derivative
        return found or None

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = begin_step(model, x, y, "ftp")
        if self.fprime and self.update_input == "h":  # the default: no pre-activation is kept (`_step`)
            return self._run(model, x, y)
        with out_of_place(model):  # fprime=False / update_input="t" differentiate at a_l: keep it apart from h_l
            return self._run(model, x, y)

    def _run(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        blocks = list(model.blocks)  # a plain list: indexing or slicing the ModuleList costs 4-20 us a time
        # Under torch.autocast the layers compute in the autocast dtype, not the parameters': only autograd casts the
        # gradients back (the closed form would assign bfloat16 gradients to float32 weights, which torch refuses),
        # and folded unit errors could overflow in float16 (`_folded`).
        plain = not torch.is_autocast_enabled(x.device.type)
        derivatives = _closed_form_derivatives(blocks) if plain else None  # None unless every block is Linear + act
        folded = self._folded(blocks) if plain and derivatives is None else None  # (closed form: nothing to fold into)
        op = self._low_rank_op(blocks)  # these three checked before FTP's own taps are hooked in
        acts = self._in_place_activations(blocks)
        first = _LowRankFirst(op) if op is not None else None
        in_place = _InPlaceActivations(acts) if acts else None
        inner = _InnerTargets(model) if self.inner_targets else None
        try:
            with two_pass(model, "ftp") as passes:
                return self._step(model, blocks, x, y, passes, derivatives, inner, folded, first, in_place)
        finally:
            if inner is not None:
                inner.remove()
            if first is not None:
                first.remove()
            if in_place is not None:
                in_place.remove()

    def _on_grid(self, blocks: list[Block]) -> bool:
        """Whether G projects onto the pooled grid: the local loss is measured after block 2's input ops, and these
        are a max-pool whose windows are G's g_block x g_block patches (then perhaps a flatten)."""
        return len(blocks) > 1 and self.compare_at == "next-input" and _windows(_max_pool(blocks[1].pre)) == self.g_block

    def step_path(self, model: Net) -> StepPath:
        """What this rule's step runs on `model` beyond its definition's passes, as far as multiply-adds go: the
        analytic count (ftprop.cost) follows it, and tests/test_cost.py checks that count against the ops a step runs.
        """
        model = as_net(model)
        blocks = list(model.blocks)
        op = self._low_rank_op(blocks)
        if op is not None:  # the first pass must leave the op's output as it made it: one call, no in-place change,
            uses = sum(m is op for m in submodules(model))  # in the default layout (`_LowRankFirst.arm` checks these
            inplace = any(getattr(m, "inplace", False) for m in submodules(blocks[1]))  # at run time)
            channels_last = isinstance(op, nn.Conv2d) and not op.weight.is_contiguous()
            op = None if uses > 1 or inplace or channels_last else op
        names = {id(m): name for name, m in model.named_modules()}
        taps = inner_taps(model).values() if self.inner_targets else ()
        return StepPath(closed_form=_closed_form_derivatives(blocks) is not None, grid=self._on_grid(blocks),
                        rank_k_op=None if op is None else names[id(op)], inner_taps=tuple(names[id(m)] for m in taps))

    def _low_rank_op(self, blocks: list[Block]) -> nn.Linear | nn.Conv2d | None:
        """Block 2's first linear op when the second pass can run it at rank K (`_LowRankFirst`): a linear contrast,
        a second pass, block 2's input ops only reshaping h_1 or being the max-pool whose windows are G's patches (the
        second pass then starts from the pooled grid), and no hook in block 2 that would watch the op run."""
        if self.target_nonlin != "linear" or len(blocks) < 3 or _hooked():
            return None
        block = blocks[1]
        if not (self._on_grid(blocks) or _reshapes_only(block.pre)) or any(_hooked(m) for m in submodules(block)):
            return None
        op = block.layer
        if isinstance(op, Residual) and isinstance(op.branch, nn.Sequential) and len(op.branch):
            op = op.branch[0]
        return op if type(op) in (nn.Linear, nn.Conv2d) and "forward" not in op.__dict__ else None

    def _in_place_activations(self, blocks: list[Block]) -> list[nn.Module] | None:
        """The activations of blocks 2..L-1 that the second pass can run in place (`_InPlaceActivations`), or None.

        Only where every use of the module takes the output of a module that makes a new map (a linear or conv layer,
        a normalisation, a residual sum): the module right before it in an nn.Sequential, or a block's layer before
        its post. Not a branch's first module, whose input the shortcut reads too, nor a module used inside another
        module's own forward, where FTP cannot see what else reads its input. Not in a block where a hook on any
        module could keep a map, and not with global module hooks.
        """
        if len(blocks) < 3 or _hooked():
            return None
        uses: dict[nn.Module, bool] = {}
        for block in blocks[1:-1]:
            found, hooked = [], False  # (activation, whether this use reads a new map); any hook in the block
            for parent in submodules(block):
                hooked = hooked or _hooked(parent)
                if not parent._modules:
                    continue
                kids = [m for m in parent._modules.values() if m is not None]
                for i, m in enumerate(kids):
                    if type(m) not in _IN_PLACE or getattr(m, "negative_slope", 0.0) < 0:  # autograd has no backward
                        continue                     # for an in-place LeakyReLU of negative slope (update_input="t")
                    if isinstance(parent, nn.Sequential):
                        before = kids[i - 1] if i else (block.layer if parent is block.post else None)
                    else:
                        before = block.layer if parent is block and m is block.post else None
                    found.append((m, type(before) in _FRESH))
            for m, fresh in found:
                uses[m] = uses.get(m, True) and fresh and not hooked
        return [m for m, fresh in uses.items() if fresh and not m.inplace] or None

    def _folded(self, blocks: list[Block]) -> dict[int, list[torch.Tensor]] | None:
        """Per hidden block l = 2..L-1, its parameters, when these blocks' local loss weight w / (gamma B) can be
        applied to their gradients after the backward instead of to their errors before it; else None.

        Backward is linear in the error it starts from, so the gradients are the same up to rounding, and the error of
        such a block is one kernel, t - c h (`_tangential_gap` with scale -1), instead of two: one pass over two maps
        fewer per error (docs/ALGORITHM.md, "The folded loss weight"). Not done
        where anything could see those errors or gradients on their way (module, global module or parameter hooks:
        hardware simulation quantizes the errors, so their scale matters), where a parameter belongs to two blocks
        (its gradient would mix weights), in float16 (unit errors make gradients gamma B / w times larger), or with
        w = 0. Checked every step, as `_closed_form_derivatives` is: a model may gain hooks between steps.
        """
        if not self.deep_weight > 0 or len(blocks) < 3 or _hooked():
            return None
        owner: dict[int, int] = {}
        folded: dict[int, list[torch.Tensor]] = {}
        for l, block in enumerate(blocks):
            hidden = 0 < l < len(blocks) - 1
            params: dict[int, torch.Tensor] = {}
            for m in submodules(block):
                if hidden and _hooked(m):
                    return None
                for p in m._parameters.values():
                    if p is None:
                        continue
                    if owner.setdefault(id(p), l) != l:
                        return None
                    if hidden:
                        if p.dtype == torch.float16 or p._backward_hooks or p._post_accumulate_grad_hooks:
                            return None
                        params[id(p)] = p
            if hidden:
                folded[l] = list(params.values())
        return folded

    @staticmethod
    def _unfold(params: list[torch.Tensor], weight: float) -> None:
        """The folded loss weight (`_folded`) applied to the gradients its unit errors gave (none for frozen ones)."""
        grads = [q.grad for q in params if q.grad is not None]
        if grads:
            torch._foreach_mul_(grads, weight)

    def _step(self, model: Net, blocks: list[Block], x: torch.Tensor, y: torch.Tensor, passes,  # noqa: ANN001
              derivatives: list[tuple[Callable, nn.Module]] | None, inner: _InnerTargets | None,
              folded: dict[int, list[torch.Tensor]] | None, first: _LowRankFirst | None,
              in_place: _InPlaceActivations | None) -> StepOutput:
        batch = x.shape[0]

        # First pass: each block sees a detached input, so its graph is local to it. With closed-form local
        # gradients no graph is needed at all: FTP has no backward pass to prepare for.
        pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block l -> what the next block's max-pool passes on
        run_pre = _pool_with_positions(pooled) if self.compare_at == "next-input" else None
        with torch.set_grad_enabled(derivatives is None and torch.is_grad_enabled()):
            inputs, pre, outs = local_forward(model, x, run_pre)
        behind_pool = (self._behind_pool(blocks, pooled, pre, outs) if derivatives is None else None) or {}
        if self.fprime and self.update_input == "h":  # the pre-activations are not needed (but where an error starts
            pre = [a if l in behind_pool else None for l, a in enumerate(pre)]  # from one): let them go (on a conv
                                                                               # net, one map per block otherwise)
        z = outs[-1]
        passes.replay()  # from here on: the first pass's dropout masks and batch-norm statistics
        if in_place is not None:  # and activations that overwrite their input (allowed under autograd too, as in
            in_place.arm()        # update_input="t": none of the layers before them keeps its output for backward)

        deep = self.deep_weight / (self.gamma * batch)  # hidden blocks 2..L-1: their local loss's weight / (gamma B)
        scale = deep if folded is None else -1.0  # what their errors are built with (`_folded`)
        loss, p, e = output_error(z, y)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # autograd roots and their gradients, not yet run
        due: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (block, error, layer input on the target path)
        mid_errs: dict[int, torch.Tensor] = {}  # inner_targets: block l -> the error of its branch's first conv

        def fill(l: int, err: torch.Tensor, t_input: torch.Tensor | None) -> None:
            """Block l's gradients from its error (`_error`), or dCE/dz for the output block."""
            block, output = blocks[l], l == len(blocks) - 1  # the output layer gets dCE/dz through its own post
            if derivatives is not None:
                fn, post = derivatives[l]
                d = fn(post, err, outs[l]) if self.fprime or output else err
                source = inputs[l] if self.update_input == "h" or output else t_input
                layer = block.layer
                # a frozen parameter keeps no gradient, as under autograd; a layer used by two blocks (tied) sums
                # their local gradients, as autograd does (the gradients are None when the step begins)
                if layer.weight.requires_grad:
                    gw = d.t() @ source
                    layer.weight.grad = gw if layer.weight.grad is None else layer.weight.grad.add_(gw)
                if layer.bias is not None and layer.bias.requires_grad:
                    gb = d.sum(0)
                    layer.bias.grad = gb if layer.bias.grad is None else layer.bias.grad.add_(gb)
            elif output or self.update_input == "h":
                pending.append((pre[l] if l in behind_pool or not (self.fprime or output) else outs[l], err))
                if l in mid_errs:  # the first conv's own local loss
                    pending.append((inner.records[l][0], mid_errs.pop(l)))
            elif outs[l].requires_grad:  # (a layer with every parameter frozen has no graph and gets no gradient)
                d = torch.autograd.grad(outs[l], pre[l], err, retain_graph=True)[0] if self.fprime else err
                with torch.enable_grad():
                    pending.append((pre[0] if l == 0 else block.layer(t_input), d))  # t_0 = h_0 = x

        def ready(l: int, err: torch.Tensor, t_input: torch.Tensor) -> None:
            """Block l's error exists: pipelined, its gradients are filled and handed to `block_ready` at once (the
            later targets do not use block l); otherwise all blocks are filled after the second pass."""
            if not self.pipeline:  # the target-path input is kept only if the update uses it
                due.append((l, err, t_input if self.update_input == "t" else None))
                return
            fill(l, err, t_input)
            if pending:
                local_backward(*zip(*pending))
                pending.clear()
            if folded and l in folded:
                self._unfold(folded[l], -deep)
            if self.block_ready is not None:
                self.block_ready(l)

        with torch.no_grad():
            h1 = outs[0]
            shape = (z.shape[1], h1.numel() // batch)  # (outputs, first block's output)
            if self.G is None:
                self._draw_projections(z.shape[1], outs)
            elif self.G.shape != shape:
                raise ValueError(f"ftp: stored G has shape {tuple(self.G.shape)} but the model needs {shape} "
                                 f"(outputs x first block's output)")
            elif self.G.dtype != h1.dtype or self.G.device != h1.device:
                # a loaded G, or the model moved or cast since G was drawn: converted once and kept, as fit_matrices
                # does for the peers' matrices (`_pooled_grid` recuts its grid from the new G)
                self.G = self.G.to(device=h1.device, dtype=h1.dtype)
            deep_shapes = [(z.shape[1], h.numel() // batch) for h in outs[1:-1]] if self.inject == "every" else None
            if deep_shapes is not None:
                if [tuple(g.shape) for g in self.G_deep or []] != deep_shapes:
                    raise ValueError(f"ftp: stored G_deep has shapes {[tuple(g.shape) for g in self.G_deep or []]} "
                                     f"but inject='every' on this model needs {deep_shapes} (outputs x blocks 2..L-1's "
                                     f"outputs)")
                if any(g.dtype != h1.dtype or g.device != h1.device for g in self.G_deep):  # converted once, as G
                    self.G_deep = [g.to(device=h1.device, dtype=h1.dtype) for g in self.G_deep]
            on_grid = self._on_grid(blocks)
            # On the grid (G equal over the windows of the max-pool that reads h_1) the contrast and the target live on
            # the pooled map: pool(t_1) = pool(h_1) - gamma B err exactly, since adding one number to every value of a
            # window adds it to their max (rounding is monotone, so in floating point too); the full t_1 is never built
            start, G = (pooled[0][0], self._pooled_grid(h1)) if on_grid else (h1, self.G)
            err = self._contrast_map(p, e, batch, G, start)
            # t_1 = h_1 - gamma B err (or its pool), built only when a second pass needs it (before err is projected)
            t = torch.add(start, err, alpha=-self.gamma * batch) if len(blocks) > 2 else None
            if first is not None and rank_k_pays(e.shape[1], macs_per_output(first.op), batch):
                # block 2's first op at rank K (`_low_rank_op` checked h_1's pool or reshape)
                rows = G.view(G.shape[0], *start.shape[1:])  # G's rows as maps (or vectors) like start's samples
                rows = _after_pool(blocks[1].pre, rows) if on_grid else blocks[1].pre(rows)
                first.arm(e / batch, rows, -self.gamma * batch)
            ready(0, self._error(blocks, 0, h1, err, pooled, behind_pool, on_grid), inputs[0])
            # Second pass: the target travels forward through the network's own weights.
            for l in range(1, len(blocks) - 1):
                block = blocks[l]
                # the layer's input on the target path: pre_l(t_{l-1}), its pool already applied when on the grid
                u = _after_pool(block.pre, t) if l == 1 and on_grid else block.pre(t)
                t = block.post(block.layer(u))
                if deep_shapes is not None:  # inject="every": this block's own projected contrast joins its target
                    nudge = self._contrast_map(p, e, batch, self.G_deep[l - 1], t)
                    t = t.add_(nudge, alpha=-self.gamma * batch)
                if inner is not None and l in inner.records:  # the branch's first conv: its own target, recorded
                    held = inner.records[l][0].detach()        # by this pass, its loss weighted as a deeper block's
                    gap = _tangential_gap if self.tangent else _scaled_gap  # (no pre ops lie before the next conv)
                    # the target popped: its map is freed as soon as its error exists (the second conv has read it)
                    mid_errs[l] = gap(held, inner.records[l].pop(), scale)
                ready(l, self._gap_error(blocks, l, outs[l].detach(), t, scale, pooled, behind_pool), u)
            ready(len(blocks) - 1, e.div_(batch), inputs[-1])  # dCE/dz of the mean loss
            for l, err, t_input in due:
                fill(l, err, t_input)
        if pending:
            local_backward(*zip(*pending))
        if folded and not self.pipeline:
            self._unfold([q for params in folded.values() for q in params], -deep)
        return StepOutput(loss, z.detach() if derivatives is None else z)

    def _pooled_grid(self, h1: torch.Tensor) -> torch.Tensor:
        """G's entries one per g_block x g_block patch of the first map (n_out x C*H/k*W/k): the projection onto the
        pooled grid. Kept with the G it was cut from (a strided copy costs as much as a pass over a map) and cut
        again whenever G is another tensor (drawn, loaded or set)."""
        if self._grid is None or self._grid[0] is not self.G:
            k, (c, hh, ww) = self.g_block, h1.shape[1:]
            grid = self.G.view(-1, c, hh // k, k, ww // k, k)[:, :, :, 0, :, 0].reshape(self.G.shape[0], -1)
            self._grid = (self.G, grid)
        return self._grid[1]

    def _draw_projections(self, n_out: int, outs: list[torch.Tensor]) -> None:
        """G onto the first block's output and, with inject="every", G_l onto each deeper hidden block's, in that
        order from one generator."""
        gen = torch.Generator().manual_seed(self.seed)
        batch = outs[0].shape[0]
        self.G = self._projection(n_out, outs[0].numel() // batch, outs[0], gen)
        if self.inject == "every":
            self.G_deep = [self._projection(n_out, h.numel() // batch, h, gen, g_block=1) for h in outs[1:-1]]

    def state_dict(self) -> dict[str, Any]:
        state = {} if self.G is None else {"G": self.G}
        return state if self.G_deep is None else state | {"G_deep": self.G_deep}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ("G", "G_deep"))
        self.G = state.get("G")
        self.G_deep = state.get("G_deep")
