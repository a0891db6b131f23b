"""Difference Target Propagation (Lee, Zhang, Fischer, Bengio, "Difference Target Propagation", ECML PKDD 2015,
LNCS 9284:498-515; arXiv 1412.7525).

Each hidden layer gets a target instead of a gradient; targets travel down through learned approximate inverses
g_l of the forward blocks f_l, with a difference correction that makes t_{l-1} = h_{l-1} whenever t_l = h_l even
if g_l is an imperfect inverse. With hidden blocks h_l = f_l(h_{l-1}), l = 1 .. L-1, h_0 = x, z = f_L(h_{L-1}),
p = softmax(z), y one-hot, CE the per-sample cross-entropy, batch size B:

    top target:      t_{L-1} = h_{L-1} - eta * dCE/dh_{L-1}            (the output block's own local gradient)
    difference TP:   t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l),  l = L-1 .. 2
    layer loss:      L_l = |h_l - t_l|^2 / (2 eta B)  ->  grad wrt h_l = (h_l - t_l) / (eta B)   (l = 1 .. L-1)
    output layer:    grad wrt z = (p - y) / B                           (its own cross-entropy gradient)
    inverses:        g_l(h) = s_{l-1}(V_l h + c_l),  l = 2 .. L-1
                     L_inv_l = |g_l(f_l(h_{l-1} + eps)) - (h_{l-1} + eps)|^2 / (2B),  eps ~ N(0, noise_std^2)

Dividing the layer loss by eta (the paper has |h_l - t_l|^2 with per-layer learning rates) makes the top hidden
layer's update exactly its BP gradient for any eta and keeps the other layers' updates of the same order, so eta
only sets how far targets reach (how linear the propagation is), not the learning rate; the same convention as
FTP's division by gamma.

The inverses belong to the rule, not the model. They are created on the first step (Glorot-uniform V_l, c_l = 0,
from a generator seeded with `seed`) and trained inside `step` by plain SGD (no momentum, no weight decay) at
`inverse_lr`, after the targets of the step are computed (the order of the paper's Algorithm 1). s_{l-1} is the
post of block l-1 (the nonlinearity that produced h_{l-1}, so g_l's outputs live where h_{l-1} lives) with
inverse_activation="same", or tanh (the paper's choice) or the identity. Training the inverses (one more forward
of f_l on the noisy input, a forward and backward of g_l) is part of the step's cost. The noise comes from a
generator the rule owns; its state and the inverses are in state_dict.

Every block runs on a detached input, so no gradient crosses a layer; the only gradient that leaves a block is
dCE/dh_{L-1} from the output block, which the definition of the top target requires.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..models import Net
from ._common import (PeerRule, RuleRNG, begin_step, fit_matrices, glorot_uniform, local_backward, num_features,
                      output_error)
from .base import StepOutput

INVERSE_ACTIVATIONS = ("same", "tanh", "linear")


@dataclass
class DTP(PeerRule):
    """Difference target propagation; options: target step, reconstruction noise, inverse learning rate."""

    name = "dtp"
    eta: float = 0.1                 # target step of the top hidden layer: t_{L-1} = h_{L-1} - eta dCE/dh_{L-1}
    noise_std: float = 0.1           # std of the noise eps in the inverses' reconstruction loss
    inverse_lr: float = 0.01         # plain SGD learning rate of the inverses g_l
    inverse_activation: str = "same"  # nonlinearity of g_l: "same" (post of block l-1), "tanh", "linear"
    seed: int = 0                    # seeds the inverses' init and the noise
    inverses: list[list[torch.Tensor]] | None = field(default=None, init=False, repr=False)  # [V_l, c_l], l = 2..L-1
    rng: RuleRNG = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_options(positive=("eta", "inverse_lr"), choices={"inverse_activation": INVERSE_ACTIVATIONS},
                           nonnegative=("noise_std",))
        self.rng = RuleRNG(self.seed, offset=1)

    def _inverses(self, hidden: list[torch.Tensor], like: torch.Tensor) -> list[list[torch.Tensor]]:
        """[V, c] of g for hidden blocks 1.. (0-based): g maps that block's output back to the previous block's."""
        sizes = [num_features(h) for h in hidden]
        shapes = [(sizes[k - 1], sizes[k]) for k in range(1, len(sizes))]
        if self.inverses is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.inverses = [[glorot_uniform(o, i, 1.0, gen, like), like.new_zeros(o)] for o, i in shapes]
        weights = fit_matrices("dtp: inverse weights", [v for v, _ in self.inverses], shapes, like)
        biases = fit_matrices("dtp: inverse biases", [c for _, c in self.inverses], [(o,) for o, _ in shapes], like)
        self.inverses = [[v, c] for v, c in zip(weights, biases)]
        return self.inverses

    def _activation(self, model: Net, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """s for the inverse of hidden block k (0-based): it outputs h_{k-1}, made by block k-1."""
        if self.inverse_activation == "same":
            return model.blocks[k - 1].post
        return torch.tanh if self.inverse_activation == "tanh" else (lambda a: a)

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = begin_step(model, x, y, "dtp", mlp_only=True)
        blocks = model.blocks
        batch = x.shape[0]

        # First pass, every block on a detached input; the output block's input is a leaf that keeps its
        # gradient, so dCE/dh_{L-1} comes from the output block's own backward and goes no further.
        h = model.prepare(x)
        outs = []
        for block in blocks[:-1]:
            h = block(h.detach())
            if h.dim() != 2:
                raise NotImplementedError("dtp: the learned inverses are linear maps; hidden blocks must output "
                                          f"(batch, features), got shape {tuple(h.shape)}")
            outs.append(h)
        h_top = h.detach().requires_grad_(True)
        z = blocks[-1](h_top)
        loss, _, e = output_error(z, y)
        torch.autograd.backward(z, e / batch)  # fills the output block's grads and h_top.grad = dCE/dh_{L-1} / B
        dh_top = h_top.grad

        inverses = self._inverses(outs, z)
        with torch.no_grad():
            hs = [h.detach() for h in outs]
            targets = [torch.empty(0)] * len(hs)
            targets[-1] = hs[-1] - self.eta * batch * dh_top  # per-sample gradient: undo the 1/B of e / B
            for k in range(len(hs) - 1, 0, -1):
                v, c = inverses[k - 1]
                s = self._activation(model, k)
                targets[k - 1] = hs[k - 1] + s(F.linear(targets[k], v, c)) - s(F.linear(hs[k], v, c))
            scale = 1.0 / (self.eta * batch)
            grads = [(h - t).mul_(scale) for h, t in zip(hs, targets)]
        local_backward(outs, grads)

        self._train_inverses(model, hs, inverses)
        return StepOutput(loss, z.detach())

    def _train_inverses(self, model: Net, hs: list[torch.Tensor], inverses: list[list[torch.Tensor]]) -> None:
        """One plain SGD step per inverse on |g_l(f_l(h_{l-1} + eps)) - (h_{l-1} + eps)|^2 / (2B)."""
        if not inverses:
            return
        batch = hs[0].shape[0]
        for k in range(1, len(hs)):
            v, c = inverses[k - 1]
            noisy = hs[k - 1]
            if self.noise_std > 0:
                noise = self.rng.draw(torch.randn, noisy.shape, device=noisy.device, dtype=noisy.dtype)
                noisy = noisy + noise.mul_(self.noise_std)
            with torch.no_grad():
                fwd = model.blocks[k](noisy)
            v_leaf, c_leaf = v.detach().requires_grad_(True), c.detach().requires_grad_(True)
            rec = self._activation(model, k)(F.linear(fwd, v_leaf, c_leaf))
            rec_loss = (rec - noisy).pow(2).sum() / (2 * batch)
            gv, gc = torch.autograd.grad(rec_loss, [v_leaf, c_leaf])
            with torch.no_grad():
                v.sub_(gv, alpha=self.inverse_lr)
                c.sub_(gc, alpha=self.inverse_lr)

    def learned_state(self) -> list[torch.Tensor]:
        return [t for pair in self.inverses or [] for t in pair]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.inverses is not None:
            state["inverses"] = [[v.clone(), c.clone()] for v, c in self.inverses]  # they change every step
        rng = self.rng.state_dict()
        if rng:
            state["rng"] = rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ("inverses", "rng"))
        self.inverses = [[v.clone(), c.clone()] for v, c in state["inverses"]] if "inverses" in state else None
        self.rng.load_state_dict(state.get("rng"))
