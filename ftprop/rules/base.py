"""The interface every learning rule implements."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..models import Net


@dataclass
class StepOutput:
    """What a rule's step returns: the batch loss (cross-entropy, detached) and the logits."""

    loss: torch.Tensor
    logits: torch.Tensor


@dataclass
class Rule:
    """Base class. Subclasses are dataclasses whose fields are the rule's options.

    State that a rule creates for itself (fixed random matrices, learned
    inverses) lives in `state_dict()` so checkpoints can restore it exactly.
    """

    name: ClassVar[str] = ""

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def predict(self, model: Net, x: torch.Tensor) -> torch.Tensor:
        """Class scores for evaluation; rules that classify differently (Forward-Forward) override it."""
        return model(x)

    def learned_state(self) -> list[torch.Tensor]:
        """The tensors the rule trains itself inside `step`, not through the optimizer (DTP's inverses).

        Data-parallel training averages them across ranks after every step, as it averages the gradients.
        """
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ())

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_options(self, positive: Sequence[str] = (), choices: dict[str, Sequence[Any]] | None = None,
                      nonnegative: Sequence[str] = (), finite: Sequence[str] = ()) -> None:
        """Raise ValueError naming the rule and the option when a numeric option is not a finite number > 0
        (`positive`), >= 0 (`nonnegative`) or of any sign (`finite`), or a categorical one is not among its choices:
        every rule validates its options here, so a bad flag reads the same for all. (An infinite or NaN scale, weight
        or threshold passes a bare `>= 0` or no check at all and only shows later, as non-finite gradients or loss.)"""
        for opt in positive:
            if not 0 < getattr(self, opt) < math.inf:
                raise ValueError(f"{self.name}: {opt} must be > 0 and finite, got {getattr(self, opt)}")
        for opt in nonnegative:
            if not 0 <= getattr(self, opt) < math.inf:
                raise ValueError(f"{self.name}: {opt} must be >= 0 and finite, got {getattr(self, opt)}")
        for opt in finite:
            if not math.isfinite(getattr(self, opt)):
                raise ValueError(f"{self.name}: {opt} must be a finite number, got {getattr(self, opt)}")
        for opt, allowed in (choices or {}).items():
            if getattr(self, opt) not in allowed:
                raise ValueError(f"{self.name}: {opt} must be one of {', '.join(map(str, allowed))}, "
                                 f"got {getattr(self, opt)!r}")

    def check_state_keys(self, state: dict[str, Any], known: Sequence[str]) -> None:
        """A checkpoint from another rule or version fails loudly instead of loading half its state."""
        unknown = set(state) - set(known)
        if unknown:
            raise ValueError(f"{self.name}: unknown state keys {sorted(unknown)}"
                             + ("" if known else " (this rule keeps no state)"))


def rule_options(cls: type[Rule]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


# Words a boolean may be written as: options come as text from the command line (`--rule-opt tangent=false`) and
# TOML files, where a non-empty string such as "false" would otherwise be truthy and silently mean True.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

_KIND = {bool: "a boolean (true/false, yes/no, on/off, 1/0)", int: "an integer", float: "a number", str: "a string",
         dict: "a table"}


def typed_value(value: Any, annotation: Any, what: str) -> Any:
    """`value` as a dataclass field annotated `annotation` holds it, or ValueError naming `what`, the value and the
    type expected: the one check behind rule options (make_rule) and config keys (TrainConfig), so a wrong type fails
    where it is given rather than mid-training, or is silently truthy.

    A bool accepts BOOL_WORDS (any case) and the integers 0 and 1; an int refuses floats and bools; a float accepts
    ints (as floats); `X | None` accepts None; anything else must be an instance of the annotation's class."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(kinds) < len(typing.get_args(annotation)):
            return None
        if len(kinds) == 1:
            return typed_value(value, kinds[0], what)
        return value  # no field is a union of several types yet; checking one would need a rule for the order
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    else:
        cls = typing.get_origin(annotation) or annotation
        if not isinstance(cls, type) or isinstance(value, cls):
            return value
    kind = _KIND.get(typing.get_origin(annotation) or annotation, getattr(annotation, "__name__", str(annotation)))
    raise ValueError(f"{what} must be {kind}, got {value!r}")


def typed_options(cls: type[Rule], options: dict[str, Any]) -> dict[str, Any]:
    """`options` of rule `cls`, each checked against (and converted to) the type of the dataclass field it sets."""
    hints = typing.get_type_hints(cls)
    return {key: typed_value(value, hints[key], f"{cls.name}: option {key}") if key in hints else value
            for key, value in options.items()}


def check_grad_mode() -> None:
    """A step builds each block's local graph (or, for BP, the whole one): under torch.no_grad() or inference mode
    some rules would fail deep in autograd and others would return with no gradient at all, so every rule refuses."""
    if not torch.is_grad_enabled():
        raise RuntimeError("rule.step needs autograd: it was called with gradients disabled (torch.no_grad(), "
                           "torch.inference_mode() or torch.set_grad_enabled(False)); call it outside that context")


def check_batch(model: Net, x: torch.Tensor, y: torch.Tensor) -> None:
    """Fail early with a readable message instead of deep inside a matmul.

    Only metadata is checked, so the step never waits on the device.
    """
    check_grad_mode()
    if y.dtype != torch.int64 or y.dim() != 1:  # one-hot rows would fail in each rule's loss in another way
        raise ValueError(f"labels must be int64 class indices of shape (batch,), got {y.dtype} of shape "
                         f"{tuple(y.shape)}" + (" (one-hot rows? pass y.argmax(1))" if y.dim() == 2 else ""))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch size mismatch: x has {x.shape[0]} samples, y has {y.shape[0]}")
    check_input_dtype(model, x)


def first_parameter(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The model's first parameter in registration order, or None: a walk that stops at it, as `next(model.
    parameters())` does not cheaply (it builds the named-module generator first: 7 us against 2 on the CPU box, and
    check_batch runs every step)."""
    stack = [model]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None:
                return p
        stack.extend(reversed(m._modules.values()))
    return None


def check_input_dtype(model: torch.nn.Module, x: torch.Tensor) -> None:
    """A floating-point batch of another dtype than the model's parameters (float64 data into a float32 model, or
    the reverse) is refused with both dtypes named, rather than failing in the first matmul or conv. No rule promotes
    it: which of the two the user meant to change is theirs to say, and a silent cast would run the model in another
    precision than its parameters. Skipped under torch.autocast, which casts per op by design; batches of integers
    are left to the model (a block's `pre` may convert them)."""
    p = first_parameter(model)
    if p is not None and x.is_floating_point() and x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"x is {x.dtype} but the model's parameters are {p.dtype}: cast the batch (x.to({p.dtype})) "
                         f"or the model (model.to({x.dtype})) so that both have one dtype")
