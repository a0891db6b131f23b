"""Several rules, one budget: the same data, net, epochs and seeds for every rule.

A rule may bring its own optimiser settings and rule options (a TOML file
like those of ftprop/configs/, passed as `--rule-config RULE=FILE`), but never its own net,
data or epoch budget: those keys are refused so comparisons stay fair.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report
from .bench import benchmark
from .data import load_dataset
from .rules import make_rule
from .train import TrainConfig, TrainingDiverged, make_dir, read_toml, resolve_device, train

# The per-rule settings (RULE.toml) the studies and `ftprop reproduce` read: package data, so that an installed copy
# has them too (the checkout's configs/ is a link here, for the commands in the docs).
CONFIGS = Path(__file__).resolve().parent / "configs"

# The side-by-side step timing of every comparison table (bench.benchmark): sets of fresh models, each timed for a few
# rounds, since the ratio moves more between sets than between rounds (bench.benchmark). 20 s on the residual CNN
# with four rules (bp, ftp, dfa, pepita; measured 2026-12-01), against the hours its runs take.
TIMING_REPEATS, TIMING_ROUNDS, TIMING_STEPS = 3, 3, 10

# Keys a rule's own config may not change: they define the comparison.
SHARED_KEYS = ("dataset", "model", "hidden", "depth", "spec", "activation", "norm", "init", "epochs", "batch_size",
               "val_size", "seed", "label_noise", "shift", "quant", "rounding", "analog", "data_dir", "device", "out",
               "progress")


@dataclass
class Comparison:
    base: TrainConfig
    configs: dict[str, TrainConfig]            # rule -> its config (seed and out filled per run)
    results: dict[str, list[dict[str, Any]]]   # rule -> per-seed metrics.json contents
    histories: dict[str, list[list[dict[str, Any]]]]  # rule -> per-seed per-epoch metrics
    costs: dict[str, dict[str, Any]]           # rule -> FLOPs and peak memory of one training step (bench.benchmark)
    machines: list[str]                        # the machine each run recorded (a resumed run may be another's)

    def machine_line(self) -> str:
        """Where the step costs were timed (now, here) and where the runs were made, which differ for reused runs."""
        return f"Timed on: {report.machine()}. Runs made on: {report.counts_line(collections.Counter(self.machines))}."

    def table(self) -> str:
        return report.compare_table(self.results, self.costs)

    def describe(self) -> str:
        b = self.base
        seeds = len(next(iter(self.results.values()), []))
        return (f"{b.dataset}, {b.model_label()}, {b.epochs} epochs, batch {b.batch_size}, "
                f"seeds 0..{seeds - 1}; per-rule settings: " +
                "; ".join(f"{r}: {c.optimizer} lr {c.lr}, schedule {c.schedule}"
                          + (f", {c.rule_options}" if c.rule_options else "") for r, c in self.configs.items()))


def _check_rule_named(settings: dict[str, Any], rule: str, source: str) -> None:
    """A rule's settings may name their rule (`rule = "x"` or `[rule] name = "x"`) only as `rule`: they would
    otherwise train another rule under `rule`'s name."""
    named = settings.get("rule")
    named = named.get("name", rule) if isinstance(named, dict) else rule if named is None else named
    if named != rule:
        raise ValueError(f"{source} names rule {named!r}, not {rule!r}: it would train {named} under {rule}'s name; "
                         f"give it as --rule-config {named}=FILE (with {named} among --rules) or drop the rule name")


def load_rule_config(path: str | Path, rule: str | None = None) -> dict[str, Any]:
    """A rule's own settings from TOML: TrainConfig keys except SHARED_KEYS, rule options in a [rule] table. With
    `rule`, a file that names another rule is refused."""
    path = Path(path)
    if not path.exists() and (CONFIGS / path.name).is_file():
        # the docs' commands name configs/RULE.toml, which is there only in a checkout of the repository
        raise ValueError(f"--rule-config: no such file {path}; the settings of that name that ship with ftprop are "
                         f"{CONFIGS / path.name}")
    values = read_toml(path, "--rule-config")
    if rule is not None:
        _check_rule_named(values, rule, str(path))
    shared = sorted(set(values) & set(SHARED_KEYS))
    if shared:
        raise ValueError(f"{path}: {', '.join(shared)} must be the same for every rule in a comparison; "
                         f"set them on the command line instead")
    # Validates keys and values; the [rule] table against `rule`'s options when known (a file without a rule name
    # holds the options of the rule it is given for, not of TrainConfig's default rule), else by rule_config later.
    table = values.get("rule")
    checked = values if rule is None else {**values, "rule": {**(table if isinstance(table, dict) else {}), "name": rule}}
    if rule is None and isinstance(table, dict) and "name" not in table:
        checked = {k: v for k, v in values.items() if k != "rule"}
    TrainConfig.from_dict(checked, source=str(path))
    return values


def repo_rule_configs(rules: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """configs/RULE.toml for each rule that has one (rules without one use the comparison's settings)."""
    return {r: load_rule_config(CONFIGS / f"{r}.toml", r) for r in rules if (CONFIGS / f"{r}.toml").exists()}


def rule_config(base: TrainConfig, rule: str, overrides: dict[str, Any] | None) -> TrainConfig:
    """The base config for `rule`: base rule options apply only to base.rule; a rule config file overrides."""
    values = dataclasses.asdict(base) | {"rule": rule, "rule_options": base.rule_options if rule == base.rule else {}}
    if overrides:
        _check_rule_named(overrides, rule, f"the rule config for {rule!r}")
        settings = dict(overrides)
        table = settings.pop("rule", {})
        table = table if isinstance(table, dict) else {}  # `rule = NAME`: checked above to be this rule
        extra = TrainConfig.from_dict({**settings, "rule": {"name": rule, **table}})
        values |= {k: v for k, v in dataclasses.asdict(extra).items() if k in overrides or k == "rule_options"}
    cfg = TrainConfig(**values)
    make_rule(cfg.rule, **cfg.rule_options)  # fail early on a bad rule or option
    return cfg


def _read_record(path: Path) -> dict[str, Any] | None:
    """A run's config.json or metrics.json, or None (with a note) when it is missing or unreadable: train writes them
    atomically, so a damaged one was damaged outside (a bad copy or merge of the versioned runs), and the run is
    trained again rather than the whole study stopping on a bare JSONDecodeError."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"{path} is unreadable ({err}); training that run again", file=sys.stderr)
        return None
    if not isinstance(record, dict):
        print(f"{path} holds no JSON object; training that run again", file=sys.stderr)
        return None
    return record


def _same_run(run_dir: Path, cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> bool:
    """Whether run_dir was trained with this config (ignoring `ignore`): only then may it be reused or resumed."""
    saved = _read_record(run_dir / "config.json")
    if saved is None:
        return False
    mine, default = dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig())  # a field newer than the run: default
    return all(saved.get(k, default[k]) == mine[k] for k in mine
               if k not in ("progress", "out", "device", "data_dir", *ignore))


def check_rule_list(rules: list[str]) -> None:
    """The rules a command runs side by side (compare, bench, cost): at least one, each once. No rule would print an
    empty table; a repeat would be trained (or measured) once and reported twice."""
    if not rules:
        raise ValueError("--rules names no rule; give a comma-separated list, e.g. --rules bp,ftp")
    repeated = sorted({r for r in rules if rules.count(r) > 1})
    if repeated:
        raise ValueError(f"--rules names {', '.join(repeated)} more than once")
    variant = next((r for r in rules if ":" in r), None)  # `ftprop sequences` takes NAME:KEY=VALUE; these do not
    if variant is not None:
        name, _, option = variant.partition(":")
        raise ValueError(f"--rules names {variant!r}: here a rule's options go in --rule {name} --rule-opt {option} "
                         f"(one rule with options per command; NAME:KEY=VALUE entries are ftprop sequences')")


def run_compare(base: TrainConfig, rules: list[str], seeds: int, out: Path, resume: bool = False,
                rule_configs: dict[str, dict[str, Any]] | None = None) -> Comparison:
    """Train every rule on seeds 0..seeds-1 (seed-major, so a partial run already compares every rule)."""
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    check_rule_list(rules)  # one run directory per rule and seed: a repeat would train (or reuse) the same runs twice
    unknown = sorted(set(rule_configs or {}) - set(rules))
    if unknown:
        raise ValueError(f"--rule-config given for {', '.join(unknown)}, which is not among --rules {','.join(rules)}")
    configs = {r: rule_config(base, r, (rule_configs or {}).get(r)) for r in rules}
    make_dir(out, "--out")
    data = load_dataset(base.dataset, base.data_dir, val_size=base.val_size, device=resolve_device(base.device))
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in rules}
    histories: dict[str, list[list[dict[str, Any]]]] = {r: [] for r in rules}
    machines: list[str] = []
    for seed in range(seeds):
        for rule in rules:
            run_dir = out / f"{rule}-seed{seed}"
            cfg = dataclasses.replace(configs[rule], seed=seed, out=str(run_dir))
            done = run_dir / "metrics.json"
            saved = _read_record(done) if resume and _same_run(run_dir, cfg) else None
            # its per-epoch log too, which the curves and tables read (a finished run has it; a copy may not)
            if saved and (saved.get("epochs") == cfg.epochs or saved.get("diverged")) \
                    and (run_dir / "metrics.jsonl").exists():
                summary = saved  # finished, or ended by divergence (retraining it would only diverge again)
            else:
                try:
                    can_resume = resume and (run_dir / "checkpoint.pt").exists() and _same_run(run_dir, cfg, ("epochs",))
                    summary = train(cfg, data, resume=can_resume)
                except TrainingDiverged as err:
                    print(f"{rule} seed {seed}: {err}", file=sys.stderr)
                    summary = json.loads(done.read_text())
            results[rule].append(summary)
            record = json.loads((run_dir / "config.json").read_text())
            report.count_run(record)
            machines.append(report.recorded(record, "machine"))
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            histories[rule].append([json.loads(line) for line in lines if line])
            print(f"{rule} seed {seed}: test accuracy {summary['test_accuracy']}", file=sys.stderr)
    # FLOPs, memory and time / BP of one step, the rules timed side by side now (the runs' own wall times may come
    # from other sessions and other loads: report.compare_table). Not timed under simulated hardware (--quant,
    # --analog): the benchmark runs the float model, whose time is not what those runs cost.
    rounds = 0 if base.quant or base.analog else TIMING_ROUNDS
    costs = benchmark({r: make_rule(r, **c.rule_options) for r, c in configs.items()},
                      lambda: base.build_model(data.input_shape, data.num_classes),
                      data.x_train, data.y_train, base.batch_size, rounds=rounds, steps_per_round=TIMING_STEPS,
                      warmup=2, repeats=TIMING_REPEATS)
    comparison = Comparison(base, configs, results, histories, costs, machines)
    (out / "table.md").write_text(f"{comparison.describe()}\n\n{comparison.machine_line()}\n\n{comparison.table()}\n")
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(base), "rules": rules,
                                                  "rule_configs": {r: dataclasses.asdict(c) for r, c in configs.items()},
                                                  "results": results, "step_costs": costs}, indent=2) + "\n")
    report.plot_curves(histories, out / "curves.png", f"{base.dataset}: {base.model_label()}", results)
    return comparison
