"""Forward Target Propagation through time: FTP for recurrent nets, with no error travelling backward in time.

The paper (As-Saquib et al., arXiv 2506.11030) trains RNNs with FTP but publishes no recurrent equations; this is
our definition (docs/ALGORITHM.md, "Recurrent networks", has the measurements behind the defaults). With
h^l_t = cell_l(h^{l-1}_t, h^l_{t-1}), h^0_t = x_t, h^l_0 = 0, z = V h^L_T + c, output error e (p - y for
cross-entropy, z - y for MSE), batch size B:

    nudge:         c = -gamma e G                     (G: outputs x H_1, fixed random, entries N(0, g_scale^2))
    second pass:   tau^1_t = cell_1(x_t, tau^1_{t-1}) + [t in S] c,   tau^1_0 = 0
                   tau^l_t = cell_l(tau^{l-1}_t, tau^l_{t-1}),        l = 2 .. L
                   S = {1} (inject="first": the projected contrast is the target of the first hidden state and
                   the recurrence carries it forward) or S = {1 .. T} (inject="every": the same nudge is applied
                   to the first layer at every step and accumulates forward through the recurrence)
    or, inject="final": the projected contrast is the target of the final state, the one the readout reads, and
                   each earlier step shares in it as far as the unit's own state survives to the end:
                   tau^1_t = h^1_t + kappa_t c,  kappa_t = prod_{s=t+1..T} k_s,  k_s = cell_1.carry (per unit: the
                   GRU's update gate, the Elman cell's diagonal of dh_s/dh_{s-1}, the minGRU's 1 - z, which
                   is all of dh_s/dh_{s-1} there); deeper layers get the second
                   pass of their step alone, tau^l_t = cell_l(tau^{l-1}_t, h^l_{t-1})
    local loss:    L^l_t = |h^l_t - tau^l_t|^2 / (2 gamma B), inputs of cell_l at step t detached
                   -> error at the cell's output  (h^l_t - tau^l_t) / (gamma B), optionally with its radial part
                   (along h^l_t, per sample) removed (tangent=True)
    update:        grad theta_l = sum_t of the local losses' gradients through that one step of cell l
    readout:       the exact gradient of the loss (the true output error)

Targets only move forward in time (the second pass runs t = 1 .. T like the first), and each step's cell learns
from a loss that no other step's graph can reach, so nothing travels backward in time or down the stack.
Linearised, tau^1_t - h^1_t = -gamma sum_{s in S, s <= t} J_{t<-s} G^T e, with J_{t<-s} the forward Jacobian of
the recurrence from step s to t: DFA through time whose feedback at step t is carried by the network's own forward
dynamics instead of a fresh random matrix.

With inject="final" the error exists only at the end of the sequence, and the first layer's update equals
grad theta = (e G / B) . eps_T with per-unit eligibility traces eps_t = k_t eps_{t-1} + d h_t / d theta (one step,
inputs held), which a device accumulates forward during the first pass: the temporal credit of e-prop (Bellec et
al. 2020) with FTP's projected contrast as the learning signal. Here the stored states make the same sum cheaper
as sum_t kappa_t (e G / B) . d h_t / d theta; the reverse product that forms kappa multiplies gate values of the
first pass, no error (tests check the two forms agree).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..recurrent import RecurrentNet
from ._common import local_backward, tangential_rows
from ._recurrent import RecurrentRule, local_unroll, sequence_error
from .base import StepOutput

INJECT = ("first", "every", "final")


@dataclass
class FTPThroughTime(RecurrentRule):
    """Recurrent FTP; options: gamma, g_scale, inject ("first", "every" or "final"), tangent, seed."""

    name = "ftp"
    gamma: float = 0.01               # small: the second pass stays in the linear regime (best measured on adding)
    g_scale: float = 0.1              # standard deviation of G's entries
    inject: str = "every"             # "every" learned faster than "first"; "final" is better still on ETTh1 and
                                      # the adding problem but is not the paper's forward second pass in time
                                      # (docs/ALGORITHM.md)
    tangent: bool = False             # removing the radial part slowed learning on the adding problem
    seed: int = 0
    G: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_options(positive=("gamma", "g_scale"), choices={"inject": INJECT})

    def _projection(self, model: RecurrentNet, like: torch.Tensor) -> torch.Tensor:
        shape = (model.readout.out_features, model.cells[0].hidden_size)
        if self.G is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.G = torch.randn(*shape, generator=gen).mul_(self.g_scale)
        if tuple(self.G.shape) != shape:
            raise ValueError(f"ftp: stored G has shape {tuple(self.G.shape)} but the model needs {shape}")
        self.G = self.G.to(device=like.device, dtype=like.dtype)
        return self.G

    @torch.no_grad()
    def offsets(self, model: RecurrentNet, x: torch.Tensor, e: torch.Tensor,
                states: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """tau^l_t - h^l_t for every layer and step (module docstring); `states` is the first pass, detached.
        With inject="final" the first layer's offsets kappa_t c are formed directly, not as tau - h, so that the
        small shares of early steps keep their digits."""
        nudge = (e @ self._projection(model, e)).mul_(-self.gamma)
        x = model.inputs(x)[0]
        steps = x.shape[1]
        out: list[list[torch.Tensor]] = [[] for _ in model.cells]
        if self.inject == "final":
            first, cell = states[0], model.cells[0]
            kappa = torch.ones_like(nudge)
            for t in reversed(range(steps)):  # kappa_t = prod_{s > t} k_s: gate values of the first pass only
                out[0].append(kappa * nudge)
                if t:
                    kappa = kappa * cell.carry(x[:, t], first[t - 1], first[t])
            out[0].reverse()
            for l in range(1, len(model.cells)):
                for t in range(steps):
                    prev = states[l][t - 1] if t else torch.zeros_like(states[l][t])
                    tau = model.cells[l](states[l - 1][t] + out[l - 1][t], prev)
                    out[l].append(tau - states[l][t])
            return out
        hidden = model.initial_states(x)
        for t in range(steps):
            below = x[:, t]
            for l, cell in enumerate(model.cells):
                tau = cell(below, hidden[l])
                if l == 0 and (t == 0 or self.inject == "every"):
                    tau = tau + nudge
                out[l].append(tau - states[l][t])
                hidden[l] = below = tau
        return out

    def step(self, model: RecurrentNet, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        self.begin(model, x, y)
        states, z = local_unroll(model, x)
        err = sequence_error(z, y)
        first = [[h.detach() for h in layer] for layer in states]
        offsets = self.offsets(model, x, err.e, first)
        scale = -1.0 / (self.gamma * x.shape[0])  # (h - tau) / (gamma B) = -offset / (gamma B)
        with torch.no_grad():
            seeds = [tangential_rows(o * scale, h) if self.tangent else o * scale  # (the state cannot inflate)
                     for layer, layer_offsets in zip(first, offsets) for h, o in zip(layer, layer_offsets)]
        local_backward([*(h for layer in states for h in layer), z], [*seeds, err.dz])
        return StepOutput(err.loss, z.detach())

    def state_dict(self) -> dict[str, Any]:
        return {} if self.G is None else {"G": self.G}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ("G",))
        self.G = state.get("G")
