"""Direct Random Target Projection (Frenkel, Lefebvre, Bol, "Learning Without Feedback: Fixed Random Learning Signals
Allow for Feedforward Training of Deep Neural Networks", Frontiers in Neuroscience 15:629892, 2021).

Like DFA, but what is projected to the hidden layers is the one-hot label alone, not the error: the hidden layers
need neither the output nor a backward pass, so they can update as soon as their forward pass is done. With blocks
h_l = f_l(a_l), a_l = W_l h_{l-1} + b_l, h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B:

    hidden:        d_l = -(y B_l) * f_l'(a_l),  l = 1 .. L-1            (B_l: n_out x |h_l|, fixed random)
    output:        d_L = e = p - y
    updates:       grad W_l = d_l^T h_{l-1} / B,  grad b_l = sum_batch d_l / B

Sign convention: with d_l = -(y B_l) f', gradient descent moves h_l toward +y B_l, the projected label (the paper's
target y* projected by B_l). Since B_l is symmetric in distribution, the opposite sign is the same rule with -B_l.

B_l ~ b_scale * U(-a, a), a = sqrt(6 / (n_out + |h_l|)) (Glorot uniform), drawn once on the first step from its own
generator seeded with `seed`; it lives in state_dict. The hidden signal never involves W_L or the output: perturbing
the output layer leaves every hidden gradient unchanged.

Convolutional and residual blocks: |h_l| is the block's whole output (C x H x W for a conv map), B_l projects onto it
flattened, and -(y B_l) / B enters the block's output, so autograd through the block's own graph (post, normalisation,
conv; both convs and the shortcut of a residual block) turns it into every parameter gradient of the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import DirectProjection, num_features, one_hot


@dataclass
class DRTP(DirectProjection):
    """Direct random target projection: the projected signal is -y, the one-hot label alone. Options: b_scale, seed."""

    name = "drtp"

    def _hidden_signal(self, e: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -one_hot(y, num_features(z), z)
