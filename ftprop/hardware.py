"""Low-precision training for every rule, without touching the rules: fixed point with a per-tensor scale.

    spec = parse_quant("w8a8e8u8", rounding="stochastic")
    hw = LowPrecision(model, optimizer, spec, seed=0)     # hooks on the model and the optimizer
    rule.step(model, x, y); optimizer.step()              # as always
    hw.remove()                                           # back to float

What is quantized, and where it is intercepted (the same for every rule, since every rule runs the model's blocks):

- w, weights: every parameter the optimizer holds, after each optimizer step (and once when attached), so the
  forward and every later use see only representable weights.
- a, activations: every block's output h_l = post(a_l) (a forward hook on `block.post`), and the input of every
  block's `layer` (a forward pre-hook: the network input x, PEPITA's x + e F, FF's normalised inputs, FTP's targets
  when a rule runs a layer on them). This covers targets that travel through blocks (FTP's second pass t_l =
  block_l(t_{l-1}), PEPITA's modulated pass): they are block outputs. Gradients pass straight through (STE).
- e, errors: the gradient arriving at every block's output h_l and at every layer's output a_l (tensor hooks
  registered from the forward hooks). A rule's learning signal always enters autograd at one of these tensors:
  BP's dL/dh_l and dL/da_l; FTP's (h_l - t_l)/(gamma B) and (p - y)/B (roots of `torch.autograd.backward`); DFA's
  e B_l / B and DRTP's -y B_l / B (roots); FA's e B_l (the grad_outputs of `autograd.grad(h_l, a_l, ...)`, and the
  delta it returns, which the hook on a_l quantizes before it is returned); PEPITA's (h_l - h'_l)/B at a_l and e'/B
  at z; DTP's (h_l - t_l)/(eta B) and (p - y)/B; FF's dLoss/dh_l. What cannot be intercepted generically: values a
  rule computes by hand before handing them to autograd (FTP's t_1 = h_1 - gamma G e itself, FA's e B_l product,
  DTP's targets through its inverses) are quantized only where they enter autograd as errors; the rules' own
  matrices (G, B_l, F) and DTP's inverses (trained inside the rule) stay in float.
- u, updates: the optimizer's change of each parameter, delta = p_after - p_before (learning rate, momentum and
  weight decay included), quantized before it is applied; then the weights are requantized. Optimizer state
  (momentum buffers) stays in float, as the accumulator of a digital optimizer would.

Number format: signed fixed point with b bits and a per-tensor scale s, values q*s with integer q in
[-2^(b-1), 2^(b-1) - 1]. s is chosen per tensor and per use from its largest magnitude m: scale="pow2" (default)
takes the smallest power of two with m <= (2^(b-1) - 1) s (a true fixed-point format whose binary point moves per
tensor, i.e. block floating point; grids of different scales are nested, so requantizing is exact); scale="max"
takes s = m / (2^(b-1) - 1) (the usual float scale of fake quantization); a tensor with a NaN or an infinity gets a
non-finite s, so it comes out non-finite and a diverged run is seen (`quant_scale`). Round to nearest (ties to even) uses
`torch.fake_quantize_per_tensor_affine`; stochastic rounding q = floor(x/s + u), u ~ U[0,1) (the dither), is
unbiased, drawn from a generator owned by this object (seeded, in state_dict), so the global RNG and reproducibility
are untouched. rounding="stochastic" draws one dither per activation position per training step and reuses it for
every pass through that position in the step (a hardware dither generator reseeded each step); two-pass rules (FTP,
PEPITA, DTP) learn from the difference of two passes' activations, and with a shared dither that difference keeps
its sign and expectation and has variance at most |difference| * s, where independent draws add s^2 / 6 on average per
pass and bury a small target offset under rounding noise (FTP at 8 bits on MNIST: docs/HARDWARE.md).
rounding="stochastic-fresh" draws a new dither for every quantization. Errors, weights and updates are quantized
once per step, so they always draw fresh.
b = 32 (the default of every field) means float32: nothing is registered, and a run is bit-identical to the float
run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .rules._common import RuleRNG

ROUNDINGS = ("nearest", "stochastic", "stochastic-fresh")
SCALES = ("pow2", "max")
FLOAT_BITS = 32
_FIELDS = {"w": "weights", "a": "activations", "e": "errors", "u": "updates"}


@dataclass(frozen=True)
class QuantSpec:
    """Bits per kind of tensor (32 = float, not quantized) and the rounding and scale modes."""

    weights: int = FLOAT_BITS
    activations: int = FLOAT_BITS
    errors: int = FLOAT_BITS
    updates: int = FLOAT_BITS
    rounding: str = "nearest"
    scale: str = "pow2"

    def __post_init__(self) -> None:
        for kind in _FIELDS.values():
            bits = getattr(self, kind)
            if not isinstance(bits, int) or not 2 <= bits <= FLOAT_BITS:
                raise ValueError(f"quant: {kind} bits must be an integer from 2 to {FLOAT_BITS} (32 = float), got "
                                 f"{bits!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"quant: rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.scale not in SCALES:
            raise ValueError(f"quant: scale must be one of {', '.join(SCALES)}, got {self.scale!r}")

    @property
    def is_float(self) -> bool:
        return all(getattr(self, kind) >= FLOAT_BITS for kind in _FIELDS.values())

    def __str__(self) -> str:
        return "".join(f"{k}{getattr(self, kind)}" for k, kind in _FIELDS.items())


def parse_quant(text: str | None, rounding: str = "nearest", scale: str = "pow2") -> QuantSpec:
    """'w8a8e8u8' -> QuantSpec; letters w (weights), a (activations), e (errors/targets), u (updates), each at most
    once and in any order, each followed by its bits (2..32); an omitted letter stays float. '', 'none', 'fp32' and
    'float' mean no quantization."""
    raw = (text or "").strip().lower()
    if raw in ("", "none", "fp32", "float", "float32"):
        return QuantSpec(rounding=rounding, scale=scale)
    if not re.fullmatch(r"(?:[a-z]\d*)+", raw):
        raise ValueError(f"quant: cannot read {text!r}; expected letters w, a, e, u each followed by bits, e.g. "
                         f"'w8a8e8u8' or 'w4a8'")
    bits: dict[str, int] = {}
    for letter, digits in re.findall(r"([a-z])(\d*)", raw):
        if letter not in _FIELDS:
            raise ValueError(f"quant: unknown letter {letter!r} in {text!r}; use w (weights), a (activations), "
                             f"e (errors/targets), u (updates)")
        if not digits:
            raise ValueError(f"quant: {letter!r} in {text!r} needs a number of bits, e.g. {letter}8")
        if _FIELDS[letter] in bits:
            raise ValueError(f"quant: {letter!r} given twice in {text!r}")
        bits[_FIELDS[letter]] = int(digits)
    return QuantSpec(**bits, rounding=rounding, scale=scale)


def quant_scale(x: torch.Tensor, bits: int, scale: str = "pow2") -> torch.Tensor:
    """The per-tensor step s (a float32 scalar tensor, no host sync) for `bits`-bit signed fixed point.

    A tensor holding a NaN or an infinity gets a non-finite step (NaN or inf), so everything quantized with it comes
    out non-finite: a diverged value must reach the loss and the weights, where the training loop looks for it,
    instead of being rounded onto the grid (the nearest-rounding kernel maps NaN to the most negative level). An
    all-zero tensor gets step 1 (any step holds it)."""
    qmax = 2 ** (bits - 1) - 1
    x = x.detach()
    amax = torch.maximum(x.amax(), -x.amin()).float()  # max |x| without an |x| temporary (the fastest on CPU)
    s = amax / qmax
    if scale == "pow2":
        s = torch.exp2(torch.ceil(torch.log2(s)))
        s = torch.where(amax > s * qmax, s * 2, s)  # guard against log2 rounding
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(amax == 0, torch.ones_like(s), s).clamp_min(tiny)  # NaN == 0 is False: NaN stays


def rounding_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype stochastic rounding computes in: float32 for 16-bit floats, whose range cannot hold every step s
    (float16's smallest is 6e-8: the step of a tensor of values near 1e-6 becomes 0 and 1/s inf, giving NaN and 0)
    and whose U[0,1) dither has too few levels to be unbiased; the tensor's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def quantize(x: torch.Tensor, bits: int, rounding: str = "nearest", scale: str = "pow2",
             generator: torch.Generator | None = None, dither: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded onto the grid {q * s : q integer in [-2^(b-1), 2^(b-1) - 1]}; no autograd (use `fake_quant`).

    Any rounding but "nearest" is stochastic: it adds `dither` (U[0,1) of x's shape, in `rounding_dtype`) before the
    floor, or draws it from `generator` (which draws are shared is the caller's choice, see LowPrecision.q). A 16-bit
    x is rounded in float32 and cast back, exactly for the pow2 scale up to 12 bits (float16) or 9 (bfloat16): each
    grid value is then a number of x's dtype, and where the grid is finer than x's own spacing x lies on it already.
    """
    if bits >= FLOAT_BITS:
        return x
    x = x.detach()
    s = quant_scale(x, bits, scale)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if rounding == "nearest":
        return torch.fake_quantize_per_tensor_affine(x, s, torch.zeros((), dtype=torch.int32, device=x.device),
                                                     qmin, qmax)
    dtype = rounding_dtype(x.dtype)
    s = s.to(dtype)
    # x * (1/s) is x / s exactly for the pow2 scale; the dither is never written (it may be shared), the draw is
    # reused as the output buffer (these tensors are the size of the largest weights, every step).
    if dither is None:
        out = torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype).addcmul_(x, s.reciprocal())
    else:
        out = torch.addcmul(dither, x, s.reciprocal())
    return out.floor_().clamp_(qmin, qmax).mul_(s).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: fn(x); backward: the incoming gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quant(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return _StraightThrough.apply(x, fn) if x.requires_grad else fn(x)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("hardware: the model must be an ftprop Net (a sequence of blocks with `layer` and `post`)")
    return list(blocks)


class LowPrecision:
    """Hooks that quantize weights, activations, errors and updates of `model` trained with `optimizer`.

    `trace`: set to a list to record (kind, where, tensor) for every quantization done (for tests and debugging).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, spec: QuantSpec, seed: int = 0) -> None:
        self.spec = spec
        self.model = model
        self.optimizer = optimizer
        self.rng = RuleRNG(seed, offset=7)
        self.trace: list[tuple[str, str, torch.Tensor]] | None = None
        self.handles: list[Any] = []
        self._before: list[torch.Tensor] | None = None
        self._dithers: dict[int, torch.Tensor] = {}  # position -> this training step's dither (rounding="stochastic")
        if spec.is_float:
            return
        for i, block in enumerate(blocks_of(model)):
            # Position i is the activation between block i-1 and block i (0: the network input), so block i's output
            # and block i+1's input share position i+1: a target entering block i+1 by hand meets the same dither
            # as the activation it stands in for.
            if spec.activations < FLOAT_BITS:
                self.handles.append(block.layer.register_forward_pre_hook(self._layer_input_hook(f"blocks.{i}.layer",
                                                                                                 position=i)))
            self.handles.append(block.post.register_forward_hook(self._output_hook(f"blocks.{i}.post", position=i + 1)))
            self.handles.append(block.layer.register_forward_hook(self._output_hook(f"blocks.{i}.layer")))
        if spec.updates < FLOAT_BITS:
            self.handles.append(optimizer.register_step_pre_hook(self._before_step))
        self.handles.append(optimizer.register_step_post_hook(self._after_step))
        self.quantize_weights()

    # ---------------------------------------------------------------- quantizers
    def q(self, x: torch.Tensor, bits: int, kind: str, where: str, position: int | None = None) -> torch.Tensor:
        """Quantize x; in training, an activation at `position` under rounding="stochastic" reuses that position's
        dither of the current training step (drawn at its first use), so two passes through the same place in one
        step (a rule's first pass and its target pass) round alike and their difference stays unbiased with variance
        at most |difference| * step instead of about step^2 / 3 for independent draws."""
        gen = self.rng.get(x.device) if self.spec.rounding != "nearest" else None
        dither = None
        if position is not None and self.spec.rounding == "stochastic" and self.model.training:
            dither = self._dithers.get(position)
            dtype = rounding_dtype(x.dtype)
            if dither is None or dither.shape != x.shape or dither.device != x.device or dither.dtype != dtype:
                dither = self._dithers[position] = torch.rand(x.shape, generator=gen, device=x.device, dtype=dtype)
        out = quantize(x, bits, self.spec.rounding, self.spec.scale, gen, dither)
        if self.trace is not None:
            self.trace.append((kind, where, out.detach().clone()))
        return out

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def quantize_weights(self) -> None:
        if self.spec.weights < FLOAT_BITS:
            for p in self._params():
                p.copy_(self.q(p, self.spec.weights, "weight", "param"))

    # ---------------------------------------------------------------- hooks
    def _layer_input_hook(self, where: str, position: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if not isinstance(x, torch.Tensor) or getattr(x, "_ftprop_quantized", False):
                return None  # already a quantized block output
            return (fake_quant(x, lambda t: self.q(t, self.spec.activations, "activation", where, position)),
                    *args[1:])
        return hook

    def _output_hook(self, where: str, position: int | None = None):
        """A block's `post` (position given: its output is an activation) or `layer` (errors only)."""
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                return None
            if position is not None and self.spec.activations < FLOAT_BITS:
                out = fake_quant(out, lambda t: self.q(t, self.spec.activations, "activation", where, position))
                out._ftprop_quantized = True
            if self.spec.errors < FLOAT_BITS and out.requires_grad:
                out.register_hook(lambda g: self.q(g, self.spec.errors, "error", where))
            return out
        return hook

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._before = [p.detach().clone() for p in self._params()]

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self._dithers.clear()  # the next training step draws new dither
        if self._before is not None:
            for p, old in zip(self._params(), self._before):
                p.copy_(old.add_(self.q(p - old, self.spec.updates, "update", "param")))
            self._before = None
        self.quantize_weights()

    # ---------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def state_dict(self) -> dict[str, Any]:
        rng = self.rng.state_dict()
        return {"rng": rng} if rng else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state.get("rng"))


class Hardware:
    """The simulations attached to one model and optimizer ("quant", "analog"), saved and restored together."""

    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts = parts

    def __bool__(self) -> bool:
        return bool(self.parts)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.parts):
            raise ValueError(f"hardware: checkpoint has {sorted(state)}, this run simulates {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def remove(self) -> None:
        for part in self.parts.values():
            part.remove()


def check_hardware(quant: str = "", rounding: str = "nearest", analog: str = "") -> tuple[QuantSpec, Any]:
    """Parse and check a run's hardware settings together; clear errors for anything that cannot work."""
    from .analog import parse_device

    spec = parse_quant(quant, rounding)
    device = parse_device(analog)
    if device.n_states and (spec.weights < FLOAT_BITS or spec.updates < FLOAT_BITS):
        raise ValueError(f"quant {quant!r} sets weight/update bits but analog {analog!r} stores the weights in "
                         f"devices with {device.n_states} states; use only a and e bits with an analog device")
    return spec, device


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, quant: str = "", rounding: str = "nearest",
           analog: str = "", seed: int = 0) -> Hardware:
    """Attach what `quant` and `analog` ask for (nothing for float and the ideal device) and return it."""
    from .analog import AnalogCrossbar

    spec, device = check_hardware(quant, rounding, analog)
    parts: dict[str, Any] = {}
    if not spec.is_float:
        parts["quant"] = LowPrecision(model, optimizer, spec, seed)  # first: digital activations, then the DAC
    if not device.is_ideal:
        parts["analog"] = AnalogCrossbar(model, optimizer, device, seed)
    return Hardware(parts)
