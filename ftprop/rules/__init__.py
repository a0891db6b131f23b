"""Learning rules: objects that, given a model and a batch, fill `.grad` of every parameter.

    rule = make_rule("ftp", gamma=0.1)
    out = rule.step(model, x, y)      # fills p.grad for every parameter p
    optimizer.step()                  # any torch.optim optimizer

Each rule uses only what its definition allows (no rule reaches into
another); the registry below is the one place that knows them all.
"""
from __future__ import annotations

import ast
from typing import Any

from .base import Rule, StepOutput, rule_options, typed_options
from .bp import BP
from .bptt import BPTT
from .dfa import DFA
from .dfa_rnn import DFAThroughTime
from .drtp import DRTP
from .dtp import DTP
from .fa import FA
from .ff import FF
from .ftp import FTP
from .ftp_rnn import FTPThroughTime
from .pepita import PEPITA

RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (BP, FTP, FA, DFA, DRTP, PEPITA, DTP, FF)}

# Rules for ftprop.recurrent.RecurrentNet (x: batch x time x features). A registry of their own: they train a
# different kind of model, so they are not interchangeable with the rules above (`ftprop sequences` uses these).
SEQUENCE_RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (BPTT, FTPThroughTime, DFAThroughTime)}


def make_rule(name: str, **options: object) -> Rule:
    """Build the rule `name` with `options`; unknown names and options raise ValueError."""
    return _make(RULES, name, options)


def make_sequence_rule(name: str, **options: object) -> Rule:
    """Build the recurrent rule `name` (SEQUENCE_RULES) with `options`; unknown names and options raise ValueError."""
    return _make(SEQUENCE_RULES, name, options)


def _option_value(text: str) -> Any:
    """A rule option's value from text: a Python literal (0.1, True, "x"), else the bare word (g_dist=uniform,
    tangent=false); make_rule then converts or refuses it by the option's type (typed_options)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(items: list[str], what: str = "--rule-opt") -> dict[str, Any]:
    """Rule options from KEY=VALUE items (dashes in KEY read as underscores)."""
    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        options[key.strip().replace("-", "_")] = _option_value(text)
    return options


def rule_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """A rule with options of its own, written `NAME:KEY=VALUE:...` ("ftp:inject=final" -> ("ftp", {"inject":
    "final"})), so that one comparison can hold the same rule twice under different settings, each labelled by its
    entry. A bare name has no options of its own."""
    name, *items = entry.split(":")
    return name.strip(), parse_options(items, f"rule {entry!r}")


def checked_options(name: str, options: dict[str, Any], registry: dict[str, type[Rule]] = RULES) -> dict[str, Any]:
    """The options of rule `name` as its fields hold them (a bool written "false" is False, an int option 3 for a
    float field 3.0); an unknown rule or option, or a value of the wrong type, raises ValueError naming it."""
    if name not in registry:
        raise ValueError(f"unknown rule {name!r}; choose one of: {', '.join(registry)}")
    cls = registry[name]
    known = rule_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"rule {name!r} has no option(s) {', '.join(unknown)}; "
                         f"its options are: {', '.join(known) or '(none)'}")
    return typed_options(cls, options)


def _make(registry: dict[str, type[Rule]], name: str, options: dict[str, Any]) -> Rule:
    options = checked_options(name, options, registry)  # first: it names an unknown rule
    return registry[name](**options)


__all__ = ["RULES", "SEQUENCE_RULES", "Rule", "StepOutput", "make_rule", "make_sequence_rule", "rule_options",
           "parse_options", "rule_variant", "checked_options", "BP", "FTP", "FA", "DFA",
           "DRTP", "PEPITA", "DTP", "FF", "BPTT", "FTPThroughTime", "DFAThroughTime"]
