"""Recurrent networks written with nn.Linear layers, so every rule sees each weight matrix as an ordinary parameter.

A `RecurrentNet` is a stack of cells unrolled over time and one linear readout:

    h^l_t = cell_l(h^{l-1}_t, h^l_{t-1}),   h^0_t = x_t,  h^l_0 = 0,   t = 1 .. T,  l = 1 .. layers
    z = V h^L_T + c

Heads: many-to-one (z are class logits or a scalar, as in the adding and temporal-order problems) and
sequence-to-sequence forecasting, where z is the whole future window, horizon x channels, read linearly from the
final state (the "direct multi-horizon" readout: one forward pass, no feedback of predictions, so a forecast's error
does not compound and every rule sees one output error per sequence). `forecast(z)` views it as (B, horizon,
channels).

Cells:
- `ElmanCell`: h' = tanh(W x + U h + b).
- `GRUCell`, the original gated recurrent unit (Cho et al. 2014), with the reset gate applied before the recurrent
  matmul: u = sigmoid(W_u x + U_u h + b_u) (update), r = sigmoid(W_r x + U_r h + b_r) (reset),
  n = tanh(W_n x + U_n (r * h) + b_n), h' = u * h + (1 - u) * n.
- `MinGRUCell`, the minimal GRU of Feng et al. (2024): gate and candidate read the input only,
  z = sigmoid(W_z x + b_z), n = W_n x + b_n, h' = (1 - z) * h + z * n. The recurrence is elementwise, so a unit's
  state depends on its own past alone and dh'/dh = diag(1 - z) exactly: forward-only temporal credit through the
  unit's own carry (FTP's inject="final", e-prop) is then the exact credit in time, not an approximation.

Recurrent matrices start orthogonal (Saxe et al. 2014): a norm-preserving start lets signals (activations forward,
errors or targets carried in time) survive many steps, which long-term-dependency tasks need from every rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

def _orthogonal_blocks(weight: torch.Tensor, blocks: int) -> None:
    """Each (H x H) block of a stacked recurrent matrix (blocks * H, H) orthogonal."""
    with torch.no_grad():
        for w in weight.chunk(blocks, dim=0):
            nn.init.orthogonal_(w)


class ElmanCell(nn.Module):
    """h' = tanh(inp(x) + rec(h)); inp carries the bias."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, hidden_size)
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)
        _orthogonal_blocks(self.rec.weight, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inp(x) + self.rec(h))

    def carry(self, x: torch.Tensor, h: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
        """Per unit, how much of its own state survives one step: the diagonal of dh'/dh, (1 - h'^2) U_jj.
        Used by forward-only rules that credit a step with the final state's error through the unit's own
        dynamics (`FTPThroughTime(inject="final")`); no other unit's path is followed."""
        return (1 - h_new * h_new) * self.rec.weight.diagonal()


class GRUCell(nn.Module):
    """The gated recurrent unit of Cho et al. (2014); inp computes the input parts of u, r and n in one matmul."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, 3 * hidden_size)
        self.rec_gates = nn.Linear(hidden_size, 2 * hidden_size, bias=False)  # U_u, U_r
        self.rec_cand = nn.Linear(hidden_size, hidden_size, bias=False)       # U_n
        _orthogonal_blocks(self.rec_gates.weight, 2)
        _orthogonal_blocks(self.rec_cand.weight, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gx_u, gx_r, gx_n = self.inp(x).chunk(3, dim=1)
        gh_u, gh_r = self.rec_gates(h).chunk(2, dim=1)
        u = torch.sigmoid(gx_u + gh_u)
        r = torch.sigmoid(gx_r + gh_r)
        n = torch.tanh(gx_n + self.rec_cand(r * h))
        return torch.lerp(n, h, u)  # u * h + (1 - u) * n

    def carry(self, x: torch.Tensor, h: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
        """Per unit, how much of its own state survives one step along its direct path: the update gate u
        (h' = u h + (1 - u) n), the leak that e-prop uses for gated units. The full diagonal of dh'/dh adds the
        paths through the gates and the candidate; measured on ETTh1 it trains the same (test MSE 0.489 against
        0.491 with u alone, docs/ALGORITHM.md), so the cheaper u it is: one third of the cell's input matmuls."""
        H = self.hidden_size
        gate = F.linear(x, self.inp.weight[:H], self.inp.bias[:H]) + F.linear(h, self.rec_gates.weight[:H])
        return torch.sigmoid(gate)


class MinGRUCell(nn.Module):
    """The minimal GRU of Feng et al. (2024) (module docstring); inp computes the gate and candidate in one matmul.
    No recurrent matrix: units mix only through the layers above and the readout."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gz, n = self.inp(x).chunk(2, dim=1)
        return torch.lerp(h, n, torch.sigmoid(gz))  # (1 - z) * h + z * n

    def carry(self, x: torch.Tensor, h: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
        """dh'/dh = 1 - z = sigmoid(-gate), exactly: this cell's state has no other path to its past."""
        return torch.sigmoid(-F.linear(x, self.inp.weight[:self.hidden_size], self.inp.bias[:self.hidden_size]))


CELLS: dict[str, type[nn.Module]] = {"elman": ElmanCell, "gru": GRUCell, "mingru": MinGRUCell}


class RecurrentNet(nn.Module):
    """Stacked cells and a linear readout from the last layer's final state (module docstring)."""

    def __init__(self, cells: list[nn.Module], readout: nn.Linear, horizon: int = 0, channels: int = 0,
                 subtract_last: bool = False) -> None:
        super().__init__()
        if subtract_last and not horizon:
            raise ValueError("subtract_last applies to forecasting heads only")
        if horizon and horizon * channels != readout.out_features:  # else forecast() and subtract_last fail later
            raise ValueError(f"a forecasting head reads horizon x channels = {horizon} x {channels} outputs, but the "
                             f"readout has {readout.out_features}")
        self.cells = nn.ModuleList(cells)
        self.readout = readout
        self.horizon, self.channels, self.subtract_last = horizon, channels, subtract_last

    @property
    def input_size(self) -> int:
        """Features per time step that the first cell reads."""
        return self.cells[0].inp.in_features

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what the cells see, what is added to the readout). With subtract_last, each window's last observed
        value per channel is subtracted from its look-back and added back to every forecast step (the
        normalisation of NLinear, Zeng et al. 2023): parameter-free, so every rule trains the same parameters,
        and it removes the level shifts between ETT's training and test months."""
        check_sequence(x, self.input_size)
        if not self.subtract_last:
            return x, None
        last = x[:, -1:, :]
        return x - last, last.expand(-1, self.horizon, -1).reshape(x.shape[0], -1)

    def output(self, h: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        z = self.readout(h)
        return z if offset is None else z + offset

    def initial_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_zeros(x.shape[0], cell.hidden_size) for cell in self.cells]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_in) -> z (B, outputs)."""
        x, offset = self.inputs(x)
        states = self.initial_states(x)
        for t in range(x.shape[1]):
            below = x[:, t]
            for l, cell in enumerate(self.cells):
                states[l] = below = cell(below, states[l])
        return self.output(states[-1], offset)

    def forecast(self, z: torch.Tensor) -> torch.Tensor:
        """Outputs of a forecasting head as (B, horizon, channels)."""
        if not self.horizon:
            raise ValueError("this network has no forecasting head")
        return z.view(z.shape[0], self.horizon, self.channels)


def check_sequence(x: torch.Tensor, features: int) -> None:
    """x must be (batch, time, features) with at least one time step and the net's input features: an empty sequence
    left the readout training on the zero initial state, and other features failed in a raw matmul error."""
    if x.dim() != 3:
        raise ValueError(f"recurrent nets take (batch, time, features) inputs, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"recurrent nets need sequences of at least one time step, got shape {tuple(x.shape)}")
    if x.shape[2] != features:
        raise ValueError(f"this recurrent net takes {features} input features per time step, got {x.shape[2]} "
                         f"(input shape {tuple(x.shape)})")


def build_recurrent(cell: str, input_size: int, hidden: int, outputs: int, layers: int = 1, horizon: int = 0,
                    channels: int = 0, subtract_last: bool = False) -> RecurrentNet:
    """`layers` stacked cells of `hidden` units and a readout to `outputs` (horizon * channels for forecasting)."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}")
    if input_size < 1 or hidden < 1 or layers < 1 or outputs < 1:
        raise ValueError(f"input_size, hidden, layers and outputs must be >= 1, got {input_size}, {hidden}, {layers}, "
                         f"{outputs}")
    cells = [CELLS[cell](input_size if l == 0 else hidden, hidden) for l in range(layers)]
    return RecurrentNet(cells, nn.Linear(hidden, outputs), horizon, channels, subtract_last)
