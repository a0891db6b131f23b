"""Feedback Alignment (Lillicrap, Cownden, Tweed, Akerman, "Random synaptic feedback weights support error
backpropagation for deep learning", Nature Communications 7:13276, 2016).

Backpropagation with each transposed forward matrix replaced by a fixed random matrix of the same shape.
With blocks h_l = f_l(a_l), a_l = W_l h_{l-1} + b_l, h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B:

    output:        delta_L = dL/da_L = (p - y) / B                        (through the output block's post, if any)
    hidden:        delta_l = (delta_{l+1} B_{l+1}) * f_l'(a_l)            (BP would use delta_{l+1} W_{l+1})
    updates:       grad W_l = delta_l^T h_{l-1},  grad b_l = sum_batch delta_l

B_l (same shape as W_l, fixed, never trained) exists for l = 2 .. L; the first layer needs none. B_l ~ b_scale *
U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot uniform, the standard init of W_l), drawn once on the first step
from its own generator seeded with `seed`, so it does not disturb other randomness; it lives in state_dict.

Convolutional and residual blocks: every Linear and Conv2d gets a fixed random B of its weight's shape (a conv
kernel B, Glorot uniform with the kernel's fans), except the first block's first one, whose input gradient nobody
uses. A module used twice (weight tying) has one B, as it has one W. In the backward pass a Conv2d sends delta
back through the transposed convolution with B instead of W (torch.nn.grad.conv2d_input); its own weight gradient is
the usual one. Everything parameter-free (activations,
pooling, flatten, residual additions) and the normalisation layers keep their exact backward: they play the role of
f'. Inside a residual block both convs and the 1x1 shortcut use their B, so the block is BP-with-B too.

Implementation: every block runs on a detached input (a leaf), so no graph crosses a block; within a block each
Linear/Conv2d runs through an autograd function whose backward uses B for the input and the true input for the
weight. The error is carried from block to block by hand: backward from h_l with dL/dh_l fills block l's parameter
gradients and leaves dL/dh_{l-1} (through B) in the input's .grad. With B = W the update is exactly BP's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import WEIGHT_LAYERS, Net, submodules
from ._common import FixedMatrices, PeerRule, begin_step, fit_matrices, glorot_like, local_backward, output_error
from .base import StepOutput


class _FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b; backward: dL/dx = delta B (B in place of W), dL/dW = delta^T x, dL/db = sum delta."""

    @staticmethod
    def forward(ctx, x, weight, bias, fb):  # noqa: ANN001
        ctx.save_for_backward(x, fb)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, fb = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ fb
        if ctx.needs_input_grad[1]:
            gw = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb, None


class _FeedbackConv2d(torch.autograd.Function):
    """y = conv2d(x, W) + b; backward: dL/dx = conv2d_input(delta, B) (B in place of W), dL/dW and dL/db as usual."""

    @staticmethod
    def forward(ctx, x, weight, bias, fb, stride, padding, dilation, groups):  # noqa: ANN001
        ctx.save_for_backward(x, fb)
        ctx.conf = (weight.shape, stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, fb = ctx.saved_tensors
        w_shape, stride, padding, dilation, groups = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, fb, grad, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(x, w_shape, grad, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding_mode != "zeros":
        raise ValueError(f"fa: Conv2d with padding_mode={m.padding_mode!r} is not supported (only zero padding)")
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("fa: Conv2d with padding='same' and an even kernel is not supported")
        return (total[0] // 2, total[1] // 2)
    return tuple(m.padding)  # type: ignore[return-value]


def _feedback_forward(m: nn.Module, fb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return _FeedbackLinear.apply(x, m.weight, m.bias, fb)
    return _FeedbackConv2d.apply(x, m.weight, m.bias, fb, m.stride, _conv_padding(m), m.dilation, m.groups)


def feedback_layers(model: Net) -> list[nn.Module]:
    """The Linear/Conv2d modules that need a feedback matrix, in the order of their first use after the first one:
    all but the first block's first one, whose input gradient nobody uses. A module used twice (weight tying) has one
    W and so one B, which carries the error back at each of its uses; the first module too gets one if it is used
    again."""
    mods = [m for blk in model.blocks for _, m in blk.named_modules(remove_duplicate=False)
            if isinstance(m, WEIGHT_LAYERS)]
    return list(dict.fromkeys(mods[1:]))  # each module once (modules hash by identity)


# Modules with parameters whose exact backward FA keeps: normalisations play the role of f' in their block.
_EXACT_BACKWARD = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def check_layers(model: Net) -> None:
    """Every module with parameters of its own is a Linear or Conv2d (FA gives it a feedback matrix) or a
    normalisation. Any other (nn.Conv1d, a custom layer) would send the error back through its true weights: BP
    inside an FA step, silently."""
    for l, block in enumerate(model.blocks):
        for m in submodules(block):
            if isinstance(m, WEIGHT_LAYERS + _EXACT_BACKWARD) or all(p is None for p in m._parameters.values()):
                continue
            name = next(n for n, k in block.named_modules() if k is m)
            raise ValueError(f"fa: block {l + 1} has a {type(m).__name__} with parameters (at "
                             f"{f'layer {name!r}' if name else 'the block itself'}), for which FA has no feedback "
                             f"matrix; supported: nn.Linear and nn.Conv2d (BatchNorm, LayerNorm and GroupNorm keep "
                             f"their exact backward). Use another rule for this model (bp, dfa, ftp, ...)")


@dataclass
class FA(FixedMatrices, PeerRule):
    """Feedback alignment; options: the scale of the feedback matrices and their seed."""

    name = "fa"
    b_scale: float = 1.0   # multiplier on the Glorot-uniform range of each B_l
    seed: int = 0          # seeds the B_l, independently of the model's initialisation
    B: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # one per feedback_layers(model)

    def __post_init__(self) -> None:
        self.check_options(positive=("b_scale",))

    def _feedback(self, mods: list[nn.Module], like: torch.Tensor) -> list[torch.Tensor]:
        shapes = [tuple(m.weight.shape) for m in mods]
        if self.B is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.B = [glorot_like(s, self.b_scale, gen, like) for s in shapes]
        self.B = fit_matrices("fa: B", self.B, shapes, like)
        return self.B

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = begin_step(model, x, y, "fa")
        check_layers(model)
        mods = feedback_layers(model)
        B = self._feedback(mods, next(model.parameters()))  # (none when no Linear/Conv2d follows the first one)
        for m in mods:
            if isinstance(m, nn.Conv2d):
                _conv_padding(m)  # unsupported padding fails before any work
        saved = [(m, m.__dict__.get("forward")) for m in mods]
        inputs, outs = [], []
        try:
            for m, fb in zip(mods, B):
                m.forward = functools.partial(_feedback_forward, m, fb)
            h = model.prepare(x)
            for l, block in enumerate(model.blocks):
                h_in = h.detach().requires_grad_(l > 0)  # a leaf: the block's graph ends here
                h = block(h_in)
                inputs.append(h_in)
                outs.append(h)
        finally:
            for m, old in saved:
                if old is None:
                    del m.__dict__["forward"]
                else:
                    m.__dict__["forward"] = old
        z = outs[-1]
        loss, _, e = output_error(z, y)

        g = e / x.shape[0]                            # dL/dh_L
        for l in range(len(outs) - 1, -1, -1):
            local_backward([outs[l]], [g])            # block l's parameter gradients; dL/dh_{l-1} through B
            if l > 0:
                g = inputs[l].grad
        return StepOutput(loss, z.detach())
