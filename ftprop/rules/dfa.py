"""Direct Feedback Alignment (Nokland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks",
NeurIPS 2016).

The output error is sent straight to every hidden layer through a fixed random matrix. With blocks
h_l = f_l(a_l), a_l = W_l h_{l-1} + b_l, h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B:

    output error:  e = p - y
    hidden:        d_l = (e B_l) * f_l'(a_l),   l = 1 .. L-1            (B_l: n_out x |h_l|, fixed random)
    output:        d_L = e
    updates:       grad W_l = d_l^T h_{l-1} / B,  grad b_l = sum_batch d_l / B

B_l ~ b_scale * U(-a, a), a = sqrt(6 / (n_out + |h_l|)) (Glorot uniform for an n_out -> |h_l| matrix), drawn once on
the first step from its own generator seeded with `seed`; it lives in state_dict.

Implementation: every block runs on a detached input, so no graph crosses a layer; (e B_l) / B is the gradient
applied to h_l and autograd through block l's own post supplies f_l' (exact for LayerNorm in the post too). A
hidden layer's update depends on the rest of the network only through e.

Convolutional and residual blocks: |h_l| is the block's whole output (C x H x W for a conv map), B_l projects onto it
flattened, and (e B_l) / B enters the block's output, so autograd through the block's own graph (post, normalisation,
conv; both convs and the shortcut of a residual block) turns it into every parameter gradient of the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import DirectProjection


@dataclass
class DFA(DirectProjection):
    """Direct feedback alignment: the output error e = p - y is the projected signal. Options: b_scale, seed."""

    name = "dfa"

    def _hidden_signal(self, e: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return e
