"""An analog crossbar model for in-memory training, for every rule, without touching the rules.

    crossbar = AnalogCrossbar(model, optimizer, parse_device("reram"), seed=0)
    rule.step(model, x, y); optimizer.step()      # as always; the optimizer's change is programmed into devices

Every nn.Linear / nn.ConvNd weight inside a block's `layer` lives on a crossbar; biases, normalisation parameters,
the rules' own matrices (G, B_l, F, DTP's inverses) and the optimizer stay digital (float).

Device model (per weight w, a differential pair of conductances g+, g- in [0, 1], w = w_max (g+ - g-)):

- finite states: each conductance sits on one of `n_states` levels k / (n_states - 1).
- mapping: w_max = w_range * max|W| of the layer when attached; g+- = 1/2 +- w / (2 w_max) (the pair starts at the
  symmetry point and every update pushes one device up and the other down), clipped to [0, 1].
- update: the optimizer's change dw (SGD, momentum, weight decay as configured, computed digitally) asks each device
  for dg = +-dw / (2 w_max); it gets n = stochastic_round(|dg| / dg_0) pulses, dg_0 = 1 / (n_states - 1). One pulse
  moves g by
      up   (potentiation): dg_0 (1 + asymmetry) (1 - nonlinearity (2g - 1))
      down (depression):   dg_0 (1 - asymmetry) (1 - nonlinearity (1 - 2g))
  (nonlinearity 0: linear; 1: soft bounds, steps vanish at the bound they approach), evaluated at the current g for
  all n pulses, plus cycle-to-cycle noise c2c_noise * dg_0 * sqrt(n) * N(0, 1) (independent per pulse). The result
  is clipped to [0, 1] and snapped to a level by stochastic rounding (the expected state is the continuous one).
- programming (write) noise: the weight a device pair presents is w_max (g+ - g-) + write_noise * w_max * N(0, 1);
  the deviation is drawn anew whenever the pair is written (initial programming, any update with a pulse) and does
  not accumulate (as aihwkit's write noise on the apparent weight). Proportional to the weight range w_max.
- read noise: every analog matrix-vector product (every forward pass, and every backward pass a rule sends through
  the layer's input, i.e. BP's W^T delta) adds read_noise * w_max * |v| * N(0, 1) to each output, v the input vector
  of that output (for a convolution, its receptive field): exactly the distribution of a fresh N(0, (read_noise
  w_max)^2) perturbation of every weight at every read.
- periphery: a DAC of `dac_bits` quantizes every input vector fed to the array, an ADC of `adc_bits` every analog
  output (before the digital bias; backward reads too), both to the nearest level of a signed per-tensor max-abs
  scale (0 bits = ideal converter). The update path uses the digital x and delta (its outer product is computed
  digitally and applied as pulses, like aihwkit's digital-rank-update configurations).

Presets (PRESETS), parameters and sources:

| preset | n_states | asymmetry | nonlinearity | c2c_noise | write_noise | read_noise | DAC/ADC bits | w_range |
|---|---|---|---|---|---|---|---|---|
| ideal | - | 0 | 0 | 0 | 0 | 0 | ideal | - |
| reram | 1001 | 0.26 | 1 | 3.75 | 0.112 | 0.0175 | 7 / 9 | 2 |
| poor | 65 | 0.5 | 1 | 5 | 0.2 | 0.05 | 5 / 6 | 2 |

- ideal: no device model at all (nothing is registered): bit-identical to float training.
- reram: IBM aihwkit's ReRAM presets, fits to Gong et al., Nat. Commun. 9:2102 (2018), read from aihwkit's source
  (src/aihwkit/simulator/presets/devices.py, utils.py): ReRamSBPresetDevice (soft bounds, so nonlinearity 1;
  dw_min 0.002 on a weight range of about 2, i.e. ~1000 steps; dw_min_std 3.75 steps of cycle-to-cycle noise;
  write_noise_std 56 steps = 0.112 of w_max), the asymmetry up_down 0.26 of ReRamESPresetDevice (fit to the same
  device), and the 7-bit DAC / 9-bit ADC of PresetIOParameters. Read noise 0.0175 w_max is aihwkit's w_noise of
  its standard hardware-aware training preset (a PCM-derived figure; aihwkit's ReRAM presets themselves model
  output noise instead). The mapping to this simpler model (one pulse per device of the pair; noise per pulse and
  device) is ours, so the preset is ReRAM-like, not a calibrated device.
- poor: a stress preset of our own (few states, strong asymmetry, large noise, coarse converters), no device behind
  it.

Any parameter can be overridden: "reram:read_noise=0.05,n_states=129".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .hardware import blocks_of, fake_quant, quantize
from .rules._common import RuleRNG


@dataclass(frozen=True)
class DeviceSpec:
    """One device model; see the module docstring for every field's meaning."""

    n_states: int = 0            # conductance levels per device; 0 = no crossbar (ideal)
    asymmetry: float = 0.0       # up steps (1 + a), down steps (1 - a)
    nonlinearity: float = 0.0    # 0 linear, 1 soft bounds
    c2c_noise: float = 0.0       # std per pulse, in nominal steps
    write_noise: float = 0.0     # std of the programming deviation, in units of w_max
    read_noise: float = 0.0      # std of every weight's read perturbation per MVM, in units of w_max
    dac_bits: int = 0            # input converter bits (0 = ideal)
    adc_bits: int = 0            # output converter bits (0 = ideal)
    w_range: float = 2.0         # w_max = w_range * max|W| at attach time
    name: str = "custom"

    def __post_init__(self) -> None:
        # NaN fails every comparison below (and infinity passes `>= 0`), so finiteness is checked first, for every field
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not math.isfinite(value):
                raise ValueError(f"analog: {f.name} must be a finite number, got {value}")
        if self.n_states == 1 or self.n_states < 0:
            raise ValueError(f"analog: n_states must be 0 (ideal) or >= 2, got {self.n_states}")
        if not -1 < self.asymmetry < 1:
            raise ValueError(f"analog: asymmetry must be in (-1, 1), got {self.asymmetry}")
        if not 0 <= self.nonlinearity <= 1:
            raise ValueError(f"analog: nonlinearity must be in [0, 1], got {self.nonlinearity}")
        for f in ("c2c_noise", "write_noise", "read_noise"):
            if getattr(self, f) < 0:
                raise ValueError(f"analog: {f} must be >= 0, got {getattr(self, f)}")
        for f in ("dac_bits", "adc_bits"):
            if getattr(self, f) != 0 and not 2 <= getattr(self, f) <= 24:
                raise ValueError(f"analog: {f} must be 0 (ideal) or 2..24, got {getattr(self, f)}")
        if not self.w_range > 0:
            raise ValueError(f"analog: w_range must be > 0, got {self.w_range}")
        if self.n_states == 0 and any((self.asymmetry, self.nonlinearity, self.c2c_noise, self.write_noise)):
            raise ValueError("analog: update non-idealities need a device (n_states >= 2)")

    @property
    def is_ideal(self) -> bool:
        return self.n_states == 0 and not any((self.read_noise, self.dac_bits, self.adc_bits))


PRESETS: dict[str, DeviceSpec] = {
    "ideal": DeviceSpec(name="ideal"),
    "reram": DeviceSpec(n_states=1001, asymmetry=0.26, nonlinearity=1.0, c2c_noise=3.75, write_noise=0.112,
                        read_noise=0.0175, dac_bits=7, adc_bits=9, w_range=2.0, name="reram"),
    "poor": DeviceSpec(n_states=65, asymmetry=0.5, nonlinearity=1.0, c2c_noise=5.0, write_noise=0.2, read_noise=0.05,
                       dac_bits=5, adc_bits=6, w_range=2.0, name="poor"),
}


def parse_device(text: str | None) -> DeviceSpec:
    """'reram' or 'reram:read_noise=0.05,n_states=129' (a preset, then overrides); '' or 'none' = ideal."""
    raw = (text or "").strip()
    if raw.lower() in ("", "none", "off"):
        return PRESETS["ideal"]
    name, _, rest = raw.partition(":")
    name = name.strip().lower()
    if name not in PRESETS:
        raise ValueError(f"analog: unknown preset {name!r}; choose one of {', '.join(PRESETS)} (optionally "
                         f"followed by :key=value,... overrides)")
    fields = {f.name: f.type for f in dataclasses.fields(DeviceSpec) if f.name != "name"}
    overrides: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ValueError(f"analog: cannot read override {item!r}; expected key=value with key one of "
                             f"{', '.join(fields)}")
        try:
            overrides[key] = int(value) if fields[key] in ("int", int) else float(value)
        except ValueError:
            raise ValueError(f"analog: {key} needs a number, got {value!r}") from None
    spec = dataclasses.replace(PRESETS[name], **overrides)
    return dataclasses.replace(spec, name=raw if overrides else name)


def on_touched(touched: torch.Tensor, fn: Callable[..., torch.Tensor], keep: torch.Tensor, *inputs: torch.Tensor,
               sparse: bool | None = None) -> torch.Tensor:
    """`keep` with its entries where `touched` replaced by fn(*inputs at those entries).

    fn works elementwise and draws its own random numbers for the shape it is given. In a training step only a few
    percent of the devices get a pulse (|dg| is far below one step), and on CPU the random draws dominate the analog
    simulation, so the sparse form (default on CPU) gathers the touched entries and calls fn on them alone: the same
    distribution, a pulse update about 2.5x cheaper (a whole reram training step of the MNIST MLP about 1.2x). Gathering has a data-dependent size, i.e. a host sync, which a CUDA step must
    not have; there (sparse=False) fn runs on every entry and torch.where keeps the untouched ones.
    """
    if sparse is None:
        sparse = keep.device.type == "cpu"
    if not sparse:
        return torch.where(touched, fn(*inputs), keep)
    idx = touched.reshape(-1).nonzero().squeeze(1)
    out = keep.clone()
    out.view(-1)[idx] = fn(*(t.reshape(-1)[idx] for t in inputs))
    return out


def pulse_update(g: torch.Tensor, dg: torch.Tensor, spec: DeviceSpec, gen: torch.Generator | None,
                 sparse: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conductances g (on the level grid) after asking for a change dg; returns (new g, whether a pulse was sent).

    One pulse's step, with sign sgn = sign(dg): sgn dg_0 (1 + sgn asymmetry) (1 - sgn nonlinearity (2g - 1)), which is
    the up and down formulas of the module docstring in one expression (no branch: these tensors are the size of the
    largest weights and are updated every step, so the update is written in place). Only the devices that get a pulse
    draw noise and move (`on_touched`; `sparse` as there). A NaN request makes the conductance NaN, so a diverged
    optimizer shows in the presented weights instead of being dropped as "no pulse".
    """
    step0 = 1.0 / (spec.n_states - 1)
    rand = lambda shape: torch.rand(shape, generator=gen, device=g.device, dtype=g.dtype)  # noqa: E731
    n = rand(g.shape).add_(dg.abs(), alpha=1.0 / step0).floor_()  # stochastic pulse count, E[n] = |dg| / step0

    def move(g: torch.Tensor, dg: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        sgn = torch.sign(dg)
        change = (2 * g - 1).mul_(sgn).mul_(-spec.nonlinearity).add_(1)          # 1 - sgn nl (2g - 1)
        change.mul_(sgn * spec.asymmetry + 1).mul_(sgn).mul_(n).mul_(step0)      # x sgn dg_0 (1 + sgn a), n pulses
        if spec.c2c_noise > 0:
            noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
            change.add_(noise.mul_(n.sqrt()), alpha=spec.c2c_noise * step0)
        new = change.add_(g).clamp_(0, 1)
        return rand(g.shape).add_(new, alpha=1.0 / step0).floor_().clamp_(0, spec.n_states - 1).mul_(step0)  # snap

    touched = n != 0  # n >= 0, so this is n > 0, except that a NaN count (NaN request) is touched
    return on_touched(touched, move, g, g, dg, n, sparse=sparse), touched


def _read_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|v| of the input vector behind every output of `module` (Linear: the row; conv: the receptive field)."""
    sq = x.detach().pow(2)
    if isinstance(module, nn.Linear):
        return sq.sum(-1, keepdim=True).sqrt()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[sq.dim() - 2]
    ones = torch.ones(module.out_channels, module.in_channels // module.groups, *module.kernel_size,
                      dtype=sq.dtype, device=sq.device)
    if module.padding_mode != "zeros":
        raise NotImplementedError("analog: read noise for padding modes other than zeros")
    return conv(sq, ones, None, module.stride, module.padding, module.dilation, module.groups).clamp_min(0).sqrt()


def _read_norm_backward(module: nn.Module, delta: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """|v| behind every input-gradient value of a backward read W^T delta."""
    sq = delta.detach().pow(2)
    if isinstance(module, nn.Linear):
        return sq.sum(-1, keepdim=True).sqrt()
    grad_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
                  3: torch.nn.grad.conv3d_input}[sq.dim() - 2]
    ones = torch.ones(module.out_channels, module.in_channels // module.groups, *module.kernel_size,
                      dtype=sq.dtype, device=sq.device)
    return grad_input(input_shape, ones, sq, module.stride, module.padding, module.dilation,
                      module.groups).clamp_min(0).sqrt()


class _BackwardRead(torch.autograd.Function):
    """Identity forward; backward: the input gradient W^T delta as the crossbar reads it (noise, ADC)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.fn(grad), None


@dataclass
class _Array:
    module: nn.Module
    name: str
    w_max: float
    g_plus: torch.Tensor
    g_minus: torch.Tensor
    deviation: torch.Tensor  # programming deviation of the presented weight (write noise)
    # The forward in progress: its input hook leaves here where its backward read will find the delta (or None, no
    # backward read), its output hook takes it. Kept here, not on the module, so that remove() leaves the model as
    # it was, and cleared when taken, so that no delta tensor outlives its step.
    pending: dict[str, torch.Tensor] | None = None


class AnalogCrossbar:
    """Puts every Linear/Conv weight inside the blocks' layers on a simulated crossbar (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, spec: DeviceSpec, seed: int = 0) -> None:
        self.spec = spec
        self.optimizer = optimizer
        self.rng = RuleRNG(seed, offset=11)
        self.arrays: list[_Array] = []
        self.handles: list[Any] = []
        self._before: list[torch.Tensor] | None = None
        if spec.is_ideal:
            return
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for i, block in enumerate(blocks_of(model)):
            for name, m in block.layer.named_modules():
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                    if isinstance(m, nn.modules.conv._ConvTransposeNd):
                        raise NotImplementedError("analog: transposed convolutions are not modelled")
                    where = f"blocks.{i}.layer{'.' + name if name else ''}"
                    if spec.n_states and id(m.weight) not in owned:
                        raise ValueError(f"analog: {where}.weight is not in the optimizer")
                    self._add(m, where)
        if spec.n_states:
            self.handles.append(optimizer.register_step_pre_hook(self._before_step))
            self.handles.append(optimizer.register_step_post_hook(self._after_step))

    # ---------------------------------------------------------------- arrays
    def _gen(self, like: torch.Tensor) -> torch.Generator:
        return self.rng.get(like.device)

    def _add(self, m: nn.Module, where: str) -> None:
        w = m.weight.detach()
        w_max = float(w.abs().max()) * self.spec.w_range or 1.0
        arr = _Array(m, where, w_max, w.new_zeros(()), w.new_zeros(()), torch.zeros_like(w))
        if self.spec.n_states:
            step0 = 1.0 / (self.spec.n_states - 1)
            half = (w / (2 * w_max)).clamp(-0.5, 0.5)
            arr.g_plus = torch.round((0.5 + half) / step0) * step0
            arr.g_minus = torch.round((0.5 - half) / step0) * step0
            arr.deviation = self._write_noise(arr, torch.ones_like(w, dtype=torch.bool))
            with torch.no_grad():
                m.weight.copy_(self.presented(arr))
        self.arrays.append(arr)
        self.handles.append(m.register_forward_pre_hook(self._input_hook(arr)))
        self.handles.append(m.register_forward_hook(self._output_hook(arr)))

    def presented(self, arr: _Array) -> torch.Tensor:
        """The weight the array computes with: w_max (g+ - g-) plus its programming deviation."""
        return arr.w_max * (arr.g_plus - arr.g_minus) + arr.deviation

    def _write_noise(self, arr: _Array, touched: torch.Tensor) -> torch.Tensor:
        if self.spec.write_noise == 0:
            return torch.zeros_like(arr.g_plus)
        gen, scale = self._gen(arr.g_plus), self.spec.write_noise * arr.w_max
        fresh = lambda like: torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype).mul_(scale)  # noqa: E731
        return on_touched(touched, fresh, arr.deviation, arr.deviation)

    # ---------------------------------------------------------------- reads
    def _convert(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize(x, bits, "nearest", "max") if bits else x

    def _noise(self, like: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self._gen(like), device=like.device, dtype=like.dtype) * std

    def _input_hook(self, arr: _Array):
        spec = self.spec

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if spec.dac_bits:
                x = fake_quant(x, lambda t: self._convert(t, spec.dac_bits))
            if x.requires_grad and (spec.read_noise or spec.adc_bits):  # a backward read will cross the array
                box = arr.pending = {}
                shape = x.shape

                def backward_read(g: torch.Tensor) -> torch.Tensor:
                    delta = box.get("delta")
                    if delta is not None and spec.read_noise:
                        g = g + self._noise(g, spec.read_noise * arr.w_max * _read_norm_backward(module, delta, shape))
                    return self._convert(g, spec.adc_bits)
                x = _BackwardRead.apply(x, backward_read)
            else:
                arr.pending = None
            return (x, *args[1:])
        return hook

    def _output_hook(self, arr: _Array):
        spec = self.spec

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            bias = module.bias
            shape = (-1,) + (1,) * (out.dim() - 2) if not isinstance(module, nn.Linear) else (-1,)

            def read(y: torch.Tensor) -> torch.Tensor:
                analog = y - bias.view(shape) if bias is not None else y
                if spec.read_noise:
                    analog = analog + self._noise(analog, spec.read_noise * arr.w_max * _read_norm(module, x))
                analog = self._convert(analog, spec.adc_bits)
                return analog + bias.view(shape) if bias is not None else analog
            out = fake_quant(out, read)
            box, arr.pending = arr.pending, None
            if box is not None and out.requires_grad:
                out.register_hook(lambda g: box.__setitem__("delta", g))
            return out
        return hook

    # ---------------------------------------------------------------- updates
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._before = [arr.module.weight.detach().clone() for arr in self.arrays]

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        for arr, old in zip(self.arrays, self._before):
            w = arr.module.weight
            dg = (w - old) / (2 * arr.w_max)
            gen = self._gen(w)
            arr.g_plus, up = pulse_update(arr.g_plus, dg, self.spec, gen)
            arr.g_minus, down = pulse_update(arr.g_minus, -dg, self.spec, gen)
            arr.deviation = self._write_noise(arr, up | down)
            w.copy_(self.presented(arr))
        self._before = None

    # ---------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"arrays": [{"name": a.name, "w_max": a.w_max, "g_plus": a.g_plus.clone(),
                                             "g_minus": a.g_minus.clone(), "deviation": a.deviation.clone()}
                                            for a in self.arrays]}
        rng = self.rng.state_dict()
        if rng:
            state["rng"] = rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("arrays", [])
        if [s["name"] for s in saved] != [a.name for a in self.arrays]:
            raise ValueError("analog: saved arrays do not match the model's")
        for arr, s in zip(self.arrays, saved):
            arr.w_max = s["w_max"]
            arr.g_plus, arr.g_minus, arr.deviation = s["g_plus"], s["g_minus"], s["deviation"]
        self.rng.load_state_dict(state.get("rng"))


def n_levels(spec: DeviceSpec) -> int:
    """Distinct weights a pair can present without write noise: 2 (n_states - 1) + 1."""
    return 2 * (spec.n_states - 1) + 1 if spec.n_states else math.inf
