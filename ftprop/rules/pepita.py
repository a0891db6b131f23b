"""PEPITA, Present the Error to Perturb the Input To modulate Activity (Dellaferrera, Kreiman, "Error-driven Input
Modulation: Solving the Credit Assignment Problem without a Backward Pass", ICML 2022, PMLR 162:4937-4955).

Two forward passes and no backward pass: the second runs on the input shifted by the projected output error, and
each layer learns from the difference between its two activities. With blocks h_l = f_l(W_l h_{l-1} + b_l),
h_0 = x, z = h_L, p = softmax(z), y one-hot, batch size B, and F (n_out x n_in) fixed random:

    standard pass:   h_l, p;  e = p - y
    modulated pass:  h'_0 = x + e F,  h'_l = f_l(W_l h'_{l-1} + b_l),  p' = softmax(h'_L);  e' = p' - y
    first layer:     grad W_1 = (h_1 - h'_1)^T (x + e F) / B
    hidden layers:   grad W_l = (h_l - h'_l)^T h'_{l-1} / B,   l = 2 .. L-1
    last layer:      grad W_L = e'^T h'_{L-1} / B                     (output_error="modulated", the official code)
                     grad W_L = e^T h'_{L-1} / B                      (output_error="first")
    biases:          grad b_l = the same per-sample signal summed over the batch / B (the paper's nets have none)

(h_l - h'_l) is used as it is: no f' factor. F ~ f_scale * U(-sqrt(6/n_in), sqrt(6/n_in)) (He uniform times
0.05 in the paper and official code), drawn once on the first step from its own generator seeded with `seed`; it
lives in state_dict. The official code takes e' (modulated pass) for the last layer, as here by default; the
option keeps the other reading.

Recipe of the paper and official code: SGD lr 0.01, momentum 0.9, batch 64, 100 epochs, lr x0.1 at epochs 60 and
90, He-uniform init, no biases, 10% dropout on the hidden layers. Dropout: both passes see the same mask (the
official code draws one mask per batch and applies it in both passes); batch norm normalises the modulated pass
with the standard pass's batch statistics and updates its running statistics once (`two_pass`).

Convolutional and residual nets: F maps e to the whole input (C x H x W); the modulated pass runs every block as
the standard pass does (pooling, flatten, residual additions, normalisation), and (h_l - h'_l) / B is sent into
block l's pre-activation a_l = layer_l(pre_l(h'_{l-1})), so a residual block's two convs both learn from it through
the block's own graph.

Implementation: the standard pass runs without a graph. In the modulated pass each block's layer runs on a
detached input, and one backward call sends (h_l - h'_l) / B into the pre-activation of hidden block l (and e' / B
into the output block's output), so every gradient is local to its layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import Net, two_pass
from ._common import PeerRule, begin_step, fit_matrices, local_backward, num_features, out_of_place, output_error
from .base import StepOutput

OUTPUT_ERRORS = ("modulated", "first")


@dataclass
class PEPITA(PeerRule):
    """PEPITA; options: the scale of the input projection F, its seed, and which error trains the last layer."""

    name = "pepita"
    f_scale: float = 0.05            # F ~ f_scale * U(-sqrt(6/n_in), sqrt(6/n_in))
    output_error: str = "modulated"  # "modulated": e' = p' - y for the last layer (official code); "first": e
    seed: int = 0                    # seeds F, independently of the model's initialisation
    F: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_options(positive=("f_scale",), choices={"output_error": OUTPUT_ERRORS})

    def _projection(self, n_out: int, n_in: int, like: torch.Tensor) -> torch.Tensor:
        if self.F is None:
            gen = torch.Generator().manual_seed(self.seed)
            limit = self.f_scale * math.sqrt(6.0 / n_in)
            f = (torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) * 2 - 1) * limit
            self.F = f.to(device=like.device, dtype=like.dtype)
        self.F = fit_matrices("pepita: F", [self.F], [(n_out, n_in)], like)[0]
        return self.F

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = begin_step(model, x, y, "pepita")
        with two_pass(model, "pepita") as passes, out_of_place(model):  # h_l apart from the layer's output a_l
            return self._step(model, x, y, passes)

    def _step(self, model: Net, x: torch.Tensor, y: torch.Tensor, passes) -> StepOutput:  # noqa: ANN001
        batch = x.shape[0]
        blocks = model.blocks

        with torch.no_grad():  # standard pass
            h0 = model.prepare(x)
            h, acts = h0, []
            for block in blocks:
                h = block(h)
                acts.append(h)
            z = acts[-1]
            loss, _, e = output_error(z, y)
            h = h0 + (e @ self._projection(z.shape[1], num_features(h0), z)).view_as(h0)  # x + e F
        passes.replay()

        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for l, block in enumerate(blocks[:-1]):  # modulated pass: graph only inside each layer
            a = block.layer(block.pre(h))
            with torch.no_grad():
                h = block.post(a)
            roots.append(a)
            grads.append((acts[l] - h).div_(batch))
        z_mod = blocks[-1](h)
        with torch.no_grad():
            e_out = output_error(z_mod, y)[2] if self.output_error == "modulated" else e
        roots.append(z_mod)
        grads.append(e_out / batch)
        local_backward(roots, grads)
        return StepOutput(loss, z)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.F is None else {"F": self.F}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ("F",))
        self.F = state["F"].clone() if "F" in state else None
