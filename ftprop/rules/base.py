"""The interface every learning rule implements."""
from __future__ import annotations

import dataclasses
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

    def check_options(self, positive: Sequence[str] = (), choices: dict[str, Sequence[Any]] | None = None) -> None:
        """Raise ValueError naming the rule and the option when a numeric option is not > 0 or a categorical one is
        not among its choices: every rule validates its options here, so a bad flag reads the same for all."""
        for opt in positive:
            if not getattr(self, opt) > 0:
                raise ValueError(f"{self.name}: {opt} must be > 0, got {getattr(self, opt)}")
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
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch size mismatch: x has {x.shape[0]} samples, y has {y.shape[0]}")
    if y.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got {y.dtype}")
