"""Command line: `ftprop train | compare | bench | cost | sequences | reproduce | data`.

Every flag of `train` and `compare` maps onto a TrainConfig field; `--config
file.toml` sets fields from a file and flags given explicitly win over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence


from . import distributed, report, runtime
from .bench import alignment_overhead, benchmark
from .compare import check_rule_list, load_rule_config, run_compare
from .data import DATASETS, Dataset, DatasetError, cache_dir, fetch, load_dataset
from .hardware import ROUNDINGS
from .models import ACTIVATIONS, MEMORY_FORMATS
from .reproduce import DOCS as REPRODUCE_DOCS, RUNS as REPRODUCE_RUNS
from .rules import RULES, make_rule, parse_options, rule_variant
from .train import TrainConfig, TrainingDiverged, read_toml, resolve_device, train

# The exit status of a run stopped by Ctrl-C (SIGINT): 128 + the signal's number, as shells report it.
INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command, with what was kept and how to continue (its message; `main` prints it)."""


# Flags that set a rule option directly (the commonest FTP knobs); any other option via --rule-opt KEY=VALUE.
RULE_OPTION_FLAGS = {"gamma": float, "g_scale": float}


def _add_config_flags(parser: argparse.ArgumentParser, omit: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field; defaults are None so we know which flags were given. The flags named in `omit`
    (as `--epochs`) are left out: a command that would ignore them refuses them as unrecognized arguments."""
    d = TrainConfig()

    def add(flag: str, **kwargs: Any) -> None:
        if flag not in omit:
            parser.add_argument(flag, **kwargs)

    add("--config", help="TOML file with TrainConfig keys (and a [rule] table of rule options)")
    add("--dataset", choices=DATASETS, help=f"dataset (default {d.dataset})")
    add("--data-dir", help="directory holding the dataset files (else $FTPROP_DATA, cache, offline sources)")
    add("--model", help=f"mlp, paper-cnn, resnet or spec (default {d.model})")
    add("--depth", type=int, help="conv layers of --model resnet: even, >= 2 (default 6)")
    add("--spec", help="the model as a spec string, with --model spec, e.g. c32k5-relu-p2-f-l10 "
        "(grammar: ftprop.models.SPEC_GRAMMAR and docs/ALGORITHM.md)")
    add("--hidden", help=f"hidden layer sizes, comma separated (default {d.hidden})")
    add("--activation", help=f"one of {', '.join(ACTIVATIONS)} (default {d.activation})")
    add("--norm", help=f"none or layernorm; CNN models also batchnorm (default {d.norm})")
    add("--init", help=f"auto, xavier, kaiming, orthogonal or torch (default {d.init})")
    add("--memory-format", choices=MEMORY_FORMATS, help="how conv feature maps are stored: channels_last "
        "pools about 10x faster on CPU (same function; default contiguous)")
    add("--epochs", type=int, help=f"(default {d.epochs})")
    add("--batch-size", type=int, help=f"(default {d.batch_size})")
    add("--optimizer", help=f"sgd or adam (default {d.optimizer})")
    add("--lr", type=float, help=f"learning rate (default {d.lr})")
    add("--momentum", type=float, help=f"SGD's momentum, or Adam's beta1 with --optimizer adam; in [0, 1) "
        f"(default {d.momentum})")
    add("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    add("--schedule", help=f"none, step or cosine (default {d.schedule})")
    add("--lr-step", type=int, help=f"epochs between decays for --schedule step (default {d.lr_step})")
    add("--lr-decay", type=float, help=f"decay factor for --schedule step (default {d.lr_decay})")
    add("--val-size", type=int, help=f"training samples held out for validation (default {d.val_size})")
    add("--device", help="cpu, cuda or auto (default cpu)")
    add("--quant", help="low-precision training: bits of weights, activations, errors, updates, e.g. "
        "w8a8e8u8 (a letter left out stays float; default: float32)")
    add("--rounding", choices=ROUNDINGS, help="rounding of --quant: nearest, stochastic (dither shared "
        "by the passes of one training step at each activation) or stochastic-fresh (default nearest)")
    add("--analog", help="analog crossbar device: ideal, reram or poor, optionally with overrides, e.g. "
        "reram:read_noise=0.05 (default: none)")
    add("--gamma", type=float, help="FTP's gamma (rule option)")
    add("--g-scale", type=float, help="FTP's std of the projection G (rule option)")
    add("--rule-opt", action="append", default=[], metavar="KEY=VALUE",
        help="any rule option, repeatable, e.g. --rule-opt tangent=False --rule-opt g_dist=uniform")
    add("--log-alignment", type=int, metavar="N",
        help="every N steps, log each layer's angle between the rule's update and BP's (alignment.jsonl)")
    add("--label-noise", type=float, metavar="P",
        help="symmetric label noise: this fraction of training labels (0 <= P < 1) is replaced by a "
             "random other class, drawn from the run's seed; validation and test labels stay clean")
    add("--shift", type=int, metavar="N",
        help="augmentation: each training image translated by a random offset of up to N pixels in each "
             "direction (the border reflected in), drawn from the run's seed; validation and test images stay put")
    add("--no-progress", action="store_true", help="no progress bars")


def _read_config(path: str, rule: str | None = None) -> TrainConfig:
    """The TrainConfig a --config TOML file describes (its keys and values checked). A [rule] table without a `name`
    holds the options of the rule the file is used with, `rule` (--rule) where the command line gives one, so that
    `--rule pepita --config configs/pepita.toml` checks f_scale as PEPITA's option, not as one of the default rule's."""
    values = read_toml(path, "--config")
    table = values.get("rule")
    if rule is not None and isinstance(table, dict) and "name" not in table:
        values["rule"] = {**table, "name": rule}
    return TrainConfig.from_dict(values, source=str(path))


def _check_options_target(rule: str, options: dict[str, Any], names: list[str], instead: str) -> None:
    """Rule options (--rule-opt, --gamma, a config's [rule] table) apply to --rule alone: with --rule outside the
    rules run they would be dropped unchecked, and the runs would silently go without them."""
    if options and rule not in names:
        raise ValueError(f"the rule option(s) {', '.join(sorted(options))} apply to --rule {rule}, which is not among "
                         f"--rules {','.join(names)}; pass --rule NAME for the rule they are for{instead}")


def _config(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dataclasses.asdict(_read_config(args.config, args.rule)) if args.config else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None and name not in ("rule_options", "out"):
            values[name] = value
    options = dict(values.get("rule_options", {}))
    for name in RULE_OPTION_FLAGS:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    options.update(parse_options(args.rule_opt))
    values["rule_options"] = options
    if getattr(args, "no_progress", False):
        values["progress"] = False
    values.update(overrides)
    model = values.get("model", TrainConfig.model)
    if getattr(args, "hidden", None) is not None and model != "mlp":
        raise ValueError(f"--hidden sets the hidden layers of --model mlp; --model {model} takes "
                         + ("--depth" if model == "resnet" else "--spec" if model == "spec" else "no layer sizes"))
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    # --rule and --seed are TrainConfig fields (_config takes them when given); --out is one for train only
    cfg = _config(args, **({"out": args.out} if args.out is not None else {}))
    make_rule(cfg.rule, **cfg.rule_options)  # fail on a bad rule or option before loading data
    try:
        summary = train(cfg, resume=args.resume)  # data-parallel when launched by torchrun (docs/SCALING.md)
        prints = distributed.rank() == 0  # every rank returns the same summary
    except KeyboardInterrupt:
        # the checkpoint is written atomically after every epoch, so it is the last finished epoch's or absent
        if cfg.out is None:
            raise Interrupted("nothing was saved (no --out)") from None
        if (Path(cfg.out) / "checkpoint.pt").exists():
            raise Interrupted(f"{cfg.out} keeps the last finished epoch: the same command with --resume continues "
                              "the run") from None
        raise Interrupted(f"no epoch finished, so {cfg.out} holds no checkpoint: run the same command again (without "
                          "--resume) to start over") from None
    finally:  # left on errors too (every rank raises the same start-up errors), or gloo may abort the exit
        distributed.finish()
    if prints:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    rule_configs = {}
    for item in args.rule_config:
        if "=" not in item:
            raise ValueError(f"--rule-config expects RULE=FILE, got {item!r}")
        rule, path = item.split("=", 1)
        rule_configs[rule.strip()] = load_rule_config(path, rule.strip())
    out = Path(args.out)
    cfg = _config(args)
    _check_options_target(cfg.rule, cfg.rule_options, rules, ", or give a rule its own options with "
                          "--rule-config NAME=FILE (a [rule] table)")
    try:
        comparison = run_compare(cfg, rules, args.seeds, out, args.resume, rule_configs)
    except KeyboardInterrupt:
        raise Interrupted(f"the same command with --resume keeps the finished runs in {out} and resumes the "
                          "interrupted one from its last finished epoch") from None
    print(f"{comparison.describe()}\n\n{comparison.machine_line()}\n\n{comparison.table()}\n")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'curves.png'}", file=sys.stderr)
    return 0


def _rule_names(text: str) -> list[str]:
    """The rules of --rules for bench and cost, checked as compare checks its own (`check_rule_list`)."""
    names = [r.strip() for r in text.split(",") if r.strip()]
    check_rule_list(names)
    return names


# What `ftprop bench`'s step timing leaves out: it steps the float model (no --quant, --analog) with a fixed SGD
# (lr 1e-3, momentum 0.9) on random batches of the whole training set, so these flags would change nothing it times.
# --log-alignment trains whole epochs (ftprop.train), with them. --epochs, --val-size and --no-progress apply to
# neither and are not bench flags at all.
BENCH_OMITS = ("--epochs", "--val-size", "--no-progress")
STEP_BENCH_IGNORES = ("optimizer", "lr", "momentum", "weight_decay", "schedule", "lr_step", "lr_decay", "quant",
                      "rounding", "analog", "label_noise", "shift")


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = _config(args)
    ignored = [f"--{name.replace('_', '-')}" for name in STEP_BENCH_IGNORES if getattr(args, name) is not None]
    if ignored and not cfg.log_alignment:
        raise ValueError(f"{', '.join(ignored)}: ftprop bench times steps of the float model with a fixed SGD (lr "
                         f"1e-3, momentum 0.9) on random training batches, which these flags would not change; leave "
                         f"them out (they apply with --log-alignment N, which trains whole epochs)")
    names = _rule_names(args.rules)
    _check_options_target(cfg.rule, cfg.rule_options, names, "")
    rules = {name: make_rule(name, **(cfg.rule_options if name == cfg.rule else {})) for name in names}
    if args.pipeline:  # FTP once more, updating each block as soon as its target exists (ftprop/pipeline.py)
        ftp_options = cfg.rule_options if cfg.rule == "ftp" else {}
        rules["ftp-pipelined"] = make_rule("ftp", **{**ftp_options, "pipeline": True})
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_dir, device=device)
    if cfg.log_alignment:
        return _bench_alignment(args, cfg, data)
    make = lambda: cfg.build_model(data.input_shape, data.num_classes)  # noqa: E731
    results = benchmark(rules, make, data.x_train, data.y_train, cfg.batch_size, rounds=args.rounds,
                        steps_per_round=args.steps, repeats=args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    timed = lambda v, scale=1.0: "-" if v is None else f"{scale * v:.3f}"  # noqa: E731  (--rounds 0: no timings)
    ci = lambda span: "-" if span is None else f"{span[0]:.3f}-{span[1]:.3f}"  # noqa: E731  (< 6 repeats: none)
    rows = [[name, timed(r["step_time_median_s"], 1e3), timed(r["ratio_to_bp"]) + report.ratio_range(r["ratio_range"]),
             ci(r["ratio_ci"]), f"{r['flops_per_sample'] / 1e6:.3f}", f"{r['peak_memory_bytes'] / 2**20:.2f}"]
            for name, r in results.items()]
    repeated = f"{args.repeats} repeats (fresh models each) of " if args.repeats > 1 else ""
    # --rounds 0 builds one set of models and times nothing, whatever --repeats says (ftprop.bench.benchmark)
    timing = (f"{repeated}{args.rounds} interleaved rounds of {args.steps} steps" if args.rounds
              else "FLOPs and memory only (--rounds 0: no step timed)")
    print(f"{cfg.dataset}, {cfg.model_label()}, batch {cfg.batch_size}, {timing}; machine: {report.machine()}\n")
    print(report.markdown_table(["rule", "step ms (median)", "time / BP", "95% CI of its median", "MFLOP / sample",
                                 "peak MiB / step"], rows))
    return 0


def _bench_alignment(args: argparse.Namespace, cfg: TrainConfig, data: Dataset) -> int:
    """`ftprop bench --log-alignment N`: what logging alignment every N steps adds to each rule's training time."""
    if args.pipeline:
        raise ValueError("--pipeline does not combine with --log-alignment")
    results = {}
    for name in _rule_names(args.rules):
        run = dataclasses.replace(cfg, rule=name, rule_options=cfg.rule_options if name == cfg.rule else {})
        results[name] = alignment_overhead(run, data, cfg.log_alignment, rounds=args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [[name, f"{r['epoch_s_off']:.3f}", f"{r['epoch_s_on']:.3f}", f"{100 * r['overhead']:+.1f}%"]
            for name, r in results.items()]
    first = next(iter(results.values()))
    print(f"{cfg.dataset}, {cfg.model_label()}, batch {cfg.batch_size}: training epochs of {first['steps_per_epoch']} "
          f"steps with alignment logged every {cfg.log_alignment} steps against none, median of {args.rounds} "
          f"alternating rounds; machine: {report.machine()}\n")
    print(report.markdown_table(["rule", "epoch s (off)", "epoch s (logging)", "overhead"], rows))
    return 0


# The keys of a --config file that `ftprop cost` reads besides its [rule] table: the model and its input
COST_MODEL_KEYS = ("dataset", "model", "hidden", "depth", "spec", "activation", "norm")


def cmd_cost(args: argparse.Namespace) -> int:
    from . import cost

    names = _rule_names(args.rules)
    config = _read_config(args.config, args.rule) if args.config else TrainConfig()
    # the model a training config describes (as train, compare and bench read it), each key overridden by its flag;
    # the batch size stays cost's own (1: the MCU figures are per sample)
    for key in COST_MODEL_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, getattr(config, key))
    # the [rule] table of a training config (the options a study's runs trained with), then any --rule-opt
    options = config.rule_options | parse_options(args.rule_opt)
    _check_options_target(args.rule, options, names, "")
    rules = {name: make_rule(name, **(options if name == args.rule else {})) for name in names}
    skipped: dict[str, str] = {}
    shape = {k: v for k, v in (("depth", args.depth), ("spec", args.spec)) if v is not None}
    results = cost.cost_for(args.dataset, rules, model=args.model, hidden=args.hidden, activation=args.activation,
                            norm=args.norm, batch_size=args.batch_size, bytes_per_value=args.bytes_per_value,
                            skipped=skipped, **shape)
    if not results:  # every rule asked for refuses the model: an empty table would read as a result
        raise ValueError("cost: no rule asked for runs on this model:\n" +
                         "\n".join(f"  {reason}" for reason in skipped.values()))
    for name, reason in skipped.items():
        print(f"ftprop cost: {name} left out: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    # the authors' figures count the rules as defined, FTP's step as it runs at batch 1 (at larger batches it can
    # run block 2's first op at rank K: ftprop.cost)
    published = cost.PUBLISHED_FC.get(args.dataset) if (args.model == "mlp" and args.batch_size == 1
                                                        and args.hidden.replace(" ", "") == "1024,128") else None
    layers = args.hidden if args.model == "mlp" else args.spec if args.model == "spec" else \
        f"depth {args.depth}" if args.depth is not None else ""
    what = " ".join(filter(None, (args.model, layers, args.activation)))
    print(f"{args.dataset}, {what}: MACs per training sample at batch "
          f"{args.batch_size} (analytic), values kept between passes x {args.bytes_per_value} bytes, MCU latency per sample "
          + ", ".join(f"{m} {s.clock_hz / 1e6:.0f} MHz x {s.cycles_per_mac} cycles/MAC" for m, s in cost.MCUS.items())
          + "\n")
    print(cost.markdown(results, published))
    if args.layers:
        print()
        print(cost.layer_table(results))
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


def cmd_sequences(args: argparse.Namespace) -> int:
    from .recurrent import CELLS
    from .seqtrain import SeqConfig, results_table, run_sequences

    if args.cell not in CELLS:
        raise ValueError(f"unknown cell {args.cell!r}; choose one of {', '.join(CELLS)}")
    options = parse_options(args.rule_opt)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    _check_options_target(args.rule, options, [rule_variant(r)[0] for r in rules],
                          ", or give an entry of --rules its own options as NAME:KEY=VALUE")
    cfg = SeqConfig(task=args.task, T=args.T, classes=args.classes, n_train=args.n_train, n_test=args.n_test,
                    csv=args.csv, lookback=args.lookback, horizon=args.horizon, cell=args.cell, hidden=args.hidden,
                    layers=args.layers, rule=args.rule, rule_options=options, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, lr_step=args.lr_step,
                    lr_decay=args.lr_decay)
    results, _ = run_sequences(cfg, rules, args.seeds, bench_rounds=args.bench_rounds)
    schedule = {"cosine": ", cosine", "step": f", x{cfg.lr_decay} every {cfg.lr_step} epochs"}.get(cfg.schedule, "")
    print(f"{results['data']}, {cfg.cell} {cfg.layers}x{cfg.hidden}, Adam lr {cfg.lr}{schedule}, "
          f"batch {cfg.batch_size}, {cfg.epochs} epochs, seeds 0..{args.seeds - 1} (test at the best validation epoch); "
          f"machine: {report.machine()}\n")
    print(results_table(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce
    try:
        path = reproduce(args.studies, args.budget, Path(args.runs), Path(args.docs))
    except KeyboardInterrupt:
        raise Interrupted("the same command again reuses the finished runs and resumes the interrupted one") from None
    print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftprop", description="Train neural networks with Forward Target Propagation "
                                "and its peers, and compare them with backpropagation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model with one rule")
    t.add_argument("--rule", help=f"one of {', '.join(RULES)} (default {TrainConfig.rule})")
    t.add_argument("--seed", type=int, help=f"(default {TrainConfig.seed})")
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
    c.add_argument("--rule-config", action="append", default=[], metavar="RULE=FILE",
                   help="a rule's own optimiser settings and options (TOML, e.g. configs/pepita.toml); repeatable")
    _add_config_flags(c)
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="per-step time, FLOPs and memory of rules, side by side")
    b.add_argument("--rules", default="bp,ftp", help="comma-separated rules; include bp for ratios")
    b.add_argument("--rule", help="the rule that the rule options apply to (default ftp)")
    b.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15; with "
                   "--log-alignment, alternating epochs)")
    b.add_argument("--steps", type=int, default=20, help="training steps per round (default 20)")
    b.add_argument("--repeats", type=int, default=1, help="time the rounds this many times, with fresh models each "
                   "time; time / BP is then the median over repeats, with its range and, from 6 repeats, a 95%% "
                   "confidence interval for that median (default 1)")
    b.add_argument("--json", action="store_true", help="print one JSON object keyed by rule")
    b.add_argument("--pipeline", action="store_true", help="also time FTP with pipeline=True (per-block updates)")
    _add_config_flags(b, omit=BENCH_OMITS)
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("cost", help="MACs per sample, memory kept between passes and MCU latency per rule "
                       "(analytic, no data needed)")
    k.add_argument("--rules", default="bp,ftp,fa,dfa,drtp,pepita,dtp,ff", help="comma-separated rules")
    k.add_argument("--rule", default="ftp", help="the rule that --rule-opt applies to (default ftp)")
    k.add_argument("--rule-opt", action="append", default=[], metavar="KEY=VALUE", help="a rule option, repeatable")
    d = TrainConfig()
    k.add_argument("--dataset", help=f"input shape and classes of this dataset (default {d.dataset})")
    k.add_argument("--model", help=f"mlp, paper-cnn, resnet or spec (default {d.model})")
    k.add_argument("--hidden", help=f"hidden sizes of --model mlp (default {d.hidden})")
    k.add_argument("--depth", type=int, help="conv layers of --model resnet (default 6)")
    k.add_argument("--spec", help="the model as a spec string, with --model spec")
    k.add_argument("--config", help="TOML training config: its model keys (dataset, model, hidden, depth, spec, "
                   "activation, norm) under any of these flags, and its [rule] table as --rule's options (before any "
                   "--rule-opt); not its batch size")
    k.add_argument("--activation", help=f"(default {d.activation})")
    k.add_argument("--norm", help=f"none or layernorm; CNN models also batchnorm (default {d.norm})")
    k.add_argument("--batch-size", type=int, default=1, help="batch size (default 1): of the memory figure, and of "
                   "FTP's MACs where its step runs block 2's first op at rank K (ftprop.cost)")
    k.add_argument("--bytes-per-value", type=int, default=4, help="bytes per stored value (default 4, float32)")
    k.add_argument("--layers", action="store_true", help="also print the per-layer breakdown")
    k.add_argument("--json", action="store_true", help="print one JSON object keyed by rule")
    k.set_defaults(func=cmd_cost)

    q = sub.add_parser("sequences", help="recurrent nets on sequence tasks: BPTT, FTP and DFA through time; "
                       "table of test figures and cost per sequence")
    q.add_argument("--task", default="adding", help="adding, order, ett (or etth1), sunspots or co2 (default adding)")
    q.add_argument("--rules", default="bptt,ftp,dfa", help="comma-separated recurrent rules (default bptt,ftp,dfa)")
    q.add_argument("--rule", default="ftp", help="the rule that --rule-opt applies to (default ftp)")
    q.add_argument("--rule-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a rule option, repeatable, e.g. --rule-opt inject=first")
    q.add_argument("--T", type=int, default=50, help="sequence length of adding and order (default 50)")
    q.add_argument("--classes", type=int, default=4, help="temporal order: 4 or 8 classes (default 4)")
    q.add_argument("--n-train", type=int, default=10000, help="synthetic training sequences (default 10000)")
    q.add_argument("--n-test", type=int, default=2000, help="synthetic validation and test sequences (default 2000)")
    q.add_argument("--csv", help="ett: an ETT-format CSV (default $FTPROP_ETT, else ../shared/data/ett/ETTh1.csv)")
    q.add_argument("--lookback", type=int, help="forecasting look-back (default: ett 96, sunspots 24, co2 104)")
    q.add_argument("--horizon", type=int, help="forecasting horizon (ett: 96, 192, 336 or 720; default 96)")
    q.add_argument("--cell", default="gru", help="gru, elman or mingru (elementwise recurrence; default gru)")
    q.add_argument("--hidden", type=int, default=64, help="units per recurrent layer (default 64)")
    q.add_argument("--layers", type=int, default=1, help="stacked recurrent layers (default 1)")
    q.add_argument("--epochs", type=int, default=10, help="(default 10)")
    q.add_argument("--batch-size", type=int, default=64, help="(default 64)")
    q.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    q.add_argument("--schedule", default="none", help="none, cosine (the learning rate falls to 0 over the run) or "
                   "step (it is multiplied by --lr-decay every --lr-step epochs); stepped per epoch (default none)")
    q.add_argument("--lr-step", type=int, default=10, help="epochs between decays for --schedule step (default 10)")
    q.add_argument("--lr-decay", type=float, default=0.1, help="decay factor for --schedule step (default 0.1)")
    q.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    q.add_argument("--bench-rounds", type=int, default=7, help="interleaved timing rounds for the cost (default 7)")
    q.add_argument("--out", help="also write results.json (every run's history) here")
    q.set_defaults(func=cmd_sequences)

    r = sub.add_parser("reproduce", help="rerun the studies behind docs/ and regenerate docs/RESULTS.md")
    r.add_argument("studies", nargs="+", help="study names, or all (each study runs once, in the registry's order "
                   "for all)")
    r.add_argument("--budget", default="full", choices=("small", "full"),
                   help="small: the same pipeline in minutes (fewer epochs and seeds); full (the default): the published "
                   "figures, hours per study")
    r.add_argument("--runs", default=str(REPRODUCE_RUNS), help="where runs go; finished runs are reused, "
                   "interrupted ones resumed (default results/runs, versioned without checkpoints)")
    r.add_argument("--docs", default=str(REPRODUCE_DOCS), help="docs directory to write (default docs, relative to the current "
                   "directory: run from the checkout, it rewrites the checkout's docs/results/STUDY.BUDGET.*, "
                   "docs/RESULTS.md and the results table of README.md beside docs/; give a scratch folder to leave "
                   "them untouched). A full-budget section is kept in RESULTS.md over a small one")
    r.set_defaults(func=cmd_reproduce)

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
    runtime.keep_freed_memory()  # before any tensor of a step exists: every rule times and trains under it
    if getattr(args, "seeds", 1) < 1:
        print("ftprop: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if distributed.launched() and args.func is not cmd_train:  # one copy per rank: each writing the same files
        print(f"ftprop: error: ftprop {args.command} runs in one process; of the commands only `ftprop train` runs "
              f"data-parallel under torchrun (docs/SCALING.md): run ftprop {args.command} without torchrun",
              file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (DatasetError, ValueError, FileNotFoundError, TrainingDiverged) as err:
        print(f"ftprop: error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, TrainingDiverged) else 1
    except KeyboardInterrupt as err:  # Ctrl-C: one line saying what was kept, not a traceback from inside a step
        print(f"ftprop: interrupted{f'; {err}' if isinstance(err, Interrupted) else ''}", file=sys.stderr)
        return INTERRUPTED
