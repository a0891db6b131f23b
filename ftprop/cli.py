"""Command line: `ftprop train | compare | bench | data`.

Every flag of `train` and `compare` maps onto a TrainConfig field; `--config
file.toml` sets fields from a file and flags given explicitly win over it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence


from . import report
from .bench import benchmark
from .data import DATASETS, DatasetError, cache_dir, fetch, load_dataset
from .models import ACTIVATIONS, build_model
from .rules import RULES, make_rule
from .train import TrainConfig, TrainingDiverged, resolve_device, train

# Flags that set a rule option directly (the commonest FTP knobs); any other option via --rule-opt KEY=VALUE.
RULE_OPTION_FLAGS = {"gamma": float, "g_scale": float}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string option such as g_dist=uniform


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are None so we know which flags were given."""
    d = TrainConfig()
    p.add_argument("--config", help="TOML file with TrainConfig keys (and a [rule] table of rule options)")
    p.add_argument("--dataset", choices=DATASETS, help=f"dataset (default {d.dataset})")
    p.add_argument("--data-dir", help="directory holding the dataset files (else $FTPROP_DATA, cache, offline sources)")
    p.add_argument("--model", help=f"model (default {d.model})")
    p.add_argument("--hidden", help=f"hidden layer sizes, comma separated (default {d.hidden})")
    p.add_argument("--activation", help=f"one of {', '.join(ACTIVATIONS)} (default {d.activation})")
    p.add_argument("--norm", help=f"none or layernorm (default {d.norm})")
    p.add_argument("--init", help=f"auto, xavier, kaiming or torch (default {d.init})")
    p.add_argument("--epochs", type=int, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    p.add_argument("--optimizer", help=f"sgd or adam (default {d.optimizer})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    p.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    p.add_argument("--schedule", help=f"none, step or cosine (default {d.schedule})")
    p.add_argument("--lr-step", type=int, help=f"epochs between decays for --schedule step (default {d.lr_step})")
    p.add_argument("--lr-decay", type=float, help=f"decay factor for --schedule step (default {d.lr_decay})")
    p.add_argument("--val-size", type=int, help=f"training samples held out for validation (default {d.val_size})")
    p.add_argument("--device", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--gamma", type=float, help="FTP's gamma (rule option)")
    p.add_argument("--g-scale", type=float, help="FTP's std of the projection G (rule option)")
    p.add_argument("--rule-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any rule option, repeatable, e.g. --rule-opt tangent=False --rule-opt g_dist=uniform")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise ValueError(f"--config: no such file {path}")
        with open(path, "rb") as f:
            values = dict(tomllib.load(f))
        values = dataclasses.asdict(TrainConfig.from_dict(values, source=str(path)))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None and name not in ("rule_options", "out"):
            values[name] = value
    options = dict(values.get("rule_options", {}))
    for name in RULE_OPTION_FLAGS:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    for item in args.rule_opt:
        if "=" not in item:
            raise ValueError(f"--rule-opt expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        options[key.strip().replace("-", "_")] = _parse_value(text)
    values["rule_options"] = options
    if args.no_progress:
        values["progress"] = False
    values.update(overrides)
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args, rule=args.rule or TrainConfig.rule, seed=args.seed, out=args.out)
    make_rule(cfg.rule, **cfg.rule_options)  # fail on a bad rule or option before loading data
    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    base = _config(args)
    for rule in rules:
        make_rule(rule, **({} if rule != base.rule else base.rule_options))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(base.dataset, base.data_dir, val_size=base.val_size, device=resolve_device(base.device))
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in rules}
    histories: dict[str, list[list[dict[str, Any]]]] = {r: [] for r in rules}
    for seed in range(args.seeds):          # seed-major, so a partial run already compares every rule
        for rule in rules:
            opts = base.rule_options if rule == base.rule else {}
            run_dir = out / f"{rule}-seed{seed}"
            cfg = dataclasses.replace(base, rule=rule, rule_options=opts, seed=seed, out=str(run_dir))
            done = run_dir / "metrics.json"
            if args.resume and done.exists() and json.loads(done.read_text())["epochs"] == cfg.epochs:
                summary = json.loads(done.read_text())
            else:
                try:
                    summary = train(cfg, data, resume=args.resume and (run_dir / "checkpoint.pt").exists())
                except TrainingDiverged as err:
                    print(f"{rule} seed {seed}: {err}", file=sys.stderr)
                    summary = json.loads(done.read_text())
            results[rule].append(summary)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            histories[rule].append([json.loads(line) for line in lines if line])
            print(f"{rule} seed {seed}: test accuracy {summary['test_accuracy']}", file=sys.stderr)
    table = report.compare_table(results)
    header = (f"{base.dataset}, {base.model} {base.hidden} {base.activation}, {base.epochs} epochs, batch "
              f"{base.batch_size}, {base.optimizer} lr {base.lr}, schedule {base.schedule}, seeds 0..{args.seeds - 1}")
    text = f"{header}\n\nMachine: {report.machine()}\n\n{table}\n"
    print(text)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(base), "rules": rules,
                                                  "results": results}, indent=2) + "\n")
    report.plot_curves(histories, out / "curves.png", f"{base.dataset}: {base.model} {base.hidden} {base.activation}")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'curves.png'}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rules = {r.strip(): make_rule(r.strip(), **(cfg.rule_options if r.strip() == cfg.rule else {}))
             for r in args.rules.split(",") if r.strip()}
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_dir, device=device)
    make = lambda: build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.activation,  # noqa: E731
                               cfg.norm, cfg.init)
    results = benchmark(rules, make, data.x_train, data.y_train, cfg.batch_size, rounds=args.rounds,
                        steps_per_round=args.steps)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [[name, f"{1e3 * r['step_time_median_s']:.3f}", f"{r['ratio_to_bp']:.3f}" if r["ratio_to_bp"] else "-",
             f"{r['flops_per_sample'] / 1e6:.3f}", f"{r['peak_memory_bytes'] / 2**20:.2f}"] for name, r in results.items()]
    print(f"{cfg.dataset}, {cfg.model} {cfg.hidden} {cfg.activation}, batch {cfg.batch_size}, {args.rounds} interleaved "
          f"rounds of {args.steps} steps; machine: {report.machine()}\n")
    print(report.markdown_table(["rule", "step ms (median)", "time / BP", "MFLOP / sample", "peak MiB / step"], rows))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        path = fetch(args.name, Path(args.dest) if args.dest else cache_dir())
        print(f"{args.name} ready in {path}")
        return 0
    data = load_dataset(args.name, args.data_dir)
    print(f"{args.name}: train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}, "
          f"{data.num_classes} classes")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftprop", description="Train neural networks with Forward Target Propagation "
                                "and its peers, and compare them with backpropagation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model with one rule")
    t.add_argument("--rule", help=f"one of {', '.join(RULES)} (default {TrainConfig.rule})")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="run directory (config, metrics, checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="train several rules with the same budget and seeds; table + plot")
    c.add_argument("--rules", default="bp,ftp", help="comma-separated rules (default bp,ftp)")
    c.add_argument("--rule", help="the rule that the rule options (--gamma, --rule-opt, [rule]) apply to "
                   f"(default {TrainConfig.rule})")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    c.add_argument("--resume", action="store_true", help="skip finished runs and resume interrupted ones")
    _add_config_flags(c)
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="per-step time, FLOPs and memory of rules, side by side")
    b.add_argument("--rules", default="bp,ftp", help="comma-separated rules; include bp for ratios")
    b.add_argument("--rule", help="the rule that the rule options apply to (default ftp)")
    b.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    b.add_argument("--steps", type=int, default=20, help="training steps per round (default 20)")
    b.add_argument("--json", action="store_true", help="print one JSON object keyed by rule")
    _add_config_flags(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("data", help="check or fetch datasets")
    d.add_argument("action", choices=("fetch", "info"), help="fetch: download the canonical files (needs internet); "
                   "info: load and describe")
    d.add_argument("name", choices=DATASETS)
    d.add_argument("--dest", help="where fetch writes (default: the user cache directory)")
    d.add_argument("--data-dir", help="where info looks first")
    d.set_defaults(func=cmd_data)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "seeds", 1) < 1:
        print("ftprop: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (DatasetError, ValueError, FileNotFoundError, TrainingDiverged) as err:
        print(f"ftprop: error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, TrainingDiverged) else 1
