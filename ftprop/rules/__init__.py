"""Learning rules: objects that, given a model and a batch, fill `.grad` of every parameter.

    rule = make_rule("ftp", gamma=0.1)
    out = rule.step(model, x, y)      # fills p.grad for every parameter p
    optimizer.step()                  # any torch.optim optimizer

Each rule uses only what its definition allows (no rule reaches into
another); the registry below is the one place that knows them all.
"""
from __future__ import annotations

from .base import Rule, StepOutput, rule_options
from .bp import BP
from .dfa import DFA
from .drtp import DRTP
from .dtp import DTP
from .fa import FA
from .ff import FF
from .ftp import FTP
from .pepita import PEPITA

RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (BP, FTP, FA, DFA, DRTP, PEPITA, DTP, FF)}


def make_rule(name: str, **options: object) -> Rule:
    """Build the rule `name` with `options`; unknown names and options raise ValueError."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; choose one of: {', '.join(RULES)}")
    cls = RULES[name]
    known = rule_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"rule {name!r} has no option(s) {', '.join(unknown)}; "
                         f"its options are: {', '.join(known) or '(none)'}")
    return cls(**options)


__all__ = ["RULES", "Rule", "StepOutput", "make_rule", "rule_options", "BP", "FTP", "FA", "DFA", "DRTP", "PEPITA",
           "DTP", "FF"]
