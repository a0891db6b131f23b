"""`ftprop reproduce STUDY`: the commands behind every figure in docs/.

Each study trains what it needs (through `run_compare`, which skips finished
runs and resumes interrupted ones), writes its section to
docs/results/STUDY.BUDGET.md with its plots beside it, and docs/RESULTS.md is then
reassembled from all study sections, so no number in the docs is typed by
hand. `--budget small` runs the same pipeline in minutes (fewer epochs and
seeds) to check that it works; only `full` reproduces the published figures.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import report
from . import study_understanding as _understanding
from .bench import benchmark
from .compare import CONFIGS, load_rule_config, repo_rule_configs, run_compare
from .data import DATASETS, DatasetError, find_dataset_files, load_dataset
from .models import build_model
from .rules import make_rule
from .sequences import locate_sequence_task
from .train import TrainConfig


@dataclass(frozen=True)
class Budget:
    name: str
    epochs: int
    seeds: int
    bench_rounds: int       # timing rounds of a step-time table, shared out over its repeats
    bench_repeats: int = 5  # fresh sets of models per step-time table: one set's ratio varies more than its rounds
    #                         (bench.benchmark's docstring has the measurement)

    @property
    def rounds_per_repeat(self) -> int:
        return max(1, math.ceil(self.bench_rounds / self.bench_repeats))


# small checks the whole pipeline in minutes (one seed: `reproduce all --budget small` must fit 30 minutes on 2 cores)
# `ftprop reproduce`'s default folders (relative to where it runs: the checkout's)
RUNS = Path("results/runs")
DOCS = Path("docs")

BUDGETS = {"small": Budget("small", epochs=2, seeds=1, bench_rounds=5),
           "full": Budget("full", epochs=30, seeds=3, bench_rounds=21)}


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    run: Callable[[Budget, Path, Path], tuple[str, list[list[str]]]]  # (budget, runs, figures) -> (section, summary)
    # what `run` reads at a budget: image datasets (ftprop.data.DATASETS) and sequence tasks with files
    # (sequences.py), found before any study starts; tests/conftest.py's `declared_datasets` checks, for each study
    # the tests run, that it reads exactly these
    datasets: Callable[[Budget], tuple[str, ...]]


def _against_targets(comparison, targets: dict[str, float]) -> str:  # noqa: ANN001  (compare.Comparison)
    """Per rule with a target accuracy (%): met or short by how much, and whether its test accuracy was still rising
    over the last 5 epochs (a budget limit) or flat (a limit of the rule or its settings here), with its training
    accuracy beside it (a rule that fits the training set but not the test set generalises worse)."""
    lines = []
    for rule, target in targets.items():
        finished = [h for h, r in zip(comparison.histories[rule], comparison.results[rule]) if not r["diverged"] and h]
        if not finished:
            lines.append(f"- {rule}: every run diverged; target {target:.1f}%")
            continue
        final = statistics.fmean(100 * h[-1]["test_accuracy"] for h in finished)
        drift = statistics.fmean(100 * (h[-1]["test_accuracy"] - h[max(0, len(h) - 6)]["test_accuracy"])
                                 for h in finished)
        train = statistics.fmean(100 * h[-1]["train_accuracy"] for h in finished)
        verdict = "meets it" if final >= target else f"short by {target - final:.2f} points"
        trend = "still rising" if drift > 0.1 else "flat"
        lines.append(f"- {rule}: {final:.2f}% against a target of {target:.1f}%, {verdict}; over its last 5 epochs "
                     f"the test accuracy moved {drift:+.2f} points ({trend}); final training accuracy {train:.2f}%")
    return "\n".join(lines)


def _ftp_ranks(comparison, against: tuple[str, ...]) -> str:  # noqa: ANN001
    """Whether FTP's mean test accuracy is above each rule's in `against`, computed from the runs."""
    def mean(rule: str) -> float | None:
        acc = [r["test_accuracy"] for r in comparison.results.get(rule, []) if not r["diverged"]]
        return 100 * statistics.fmean(acc) if acc else None
    f = mean("ftp")
    above = [r for r in against if (m := mean(r)) is None or (f is not None and f > m)]
    below = [r for r in against if r not in above]
    return (f"FTP ({'diverged' if f is None else f'{f:.2f}%'}) is above {', '.join(above) or 'none'}"
            + (f" and not above {', '.join(below)}" if below else "") + " in mean test accuracy.")


def _compare_section(base: TrainConfig, rules: list[str], budget: Budget, runs: Path, figures: Path, key: str,
                     goal: str, rule_configs: dict[str, Path] | None = None, targets: dict[str, float] | None = None,
                     ftp_against: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """A comparison's markdown and its one-line summary for the README (test accuracy per rule).
    rule_configs: rule -> path of its TOML settings (configs/); targets: rule -> accuracy (%) it should reach;
    ftp_against: rules whose accuracy FTP's is compared with."""
    loaded = {rule: load_rule_config(path) for rule, path in (rule_configs or {}).items()}
    comparison = run_compare(base, rules, budget.seeds, runs / key, resume=True, rule_configs=loaded)
    figure = f"{key}.{budget.name}.png"
    shutil.copyfile(runs / key / "curves.png", figures / figure)
    command = (f"ftprop compare --rules {','.join(rules)} --dataset {base.dataset} --hidden {base.hidden} "
               f"--activation {base.activation} --epochs {base.epochs} --schedule {base.schedule} "
               f"--seeds {budget.seeds} --out runs/{key}"
               + "".join(f" --rule-config {rule}=configs/{path.name}" for rule, path in (rule_configs or {}).items()))
    setting = f"{base.dataset}, {base.hidden.replace(',', '-')} {base.activation}"
    accuracy = "; ".join(f"{rule} {report.pct([r['test_accuracy'] for r in runs_ if not r['diverged']])}"
                         if any(not r["diverged"] for r in runs_) else f"{rule} diverged"
                         for rule, runs_ in comparison.results.items())
    summary = [setting, accuracy, goal]
    checks = "".join(f"{text}\n\n" for text in (_against_targets(comparison, targets or {}),
                                                  _ftp_ranks(comparison, ftp_against) if ftp_against else "") if text)
    return (f"### {setting}\n\nGoal: {goal}.\n\n{comparison.describe()}.\n\n{comparison.table()}\n\n{checks}"
            f"Command: `{command}`\n\n![learning curves](results/{figure})\n"), summary


def study_mlp(budget: Budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:
    """Issue 2: FTP vs BP on the paper's MLP (MNIST tanh and ReLU, Fashion-MNIST tanh), and the step-time bench."""
    parts, summary = [], []
    for dataset, activation, goal in (
            ("mnist", "tanh", "FTP >= 98.0% mean and within 0.4 points of BP"),
            ("mnist", "relu", "FTP >= 97.8% mean, no divergence"),
            ("fashion-mnist", "tanh", "FTP within 1.0 point of BP")):
        base = TrainConfig(dataset=dataset, activation=activation, hidden="1024,128", epochs=budget.epochs,
                           schedule="cosine", progress=False)
        section, row = _compare_section(base, ["bp", "ftp"], budget, runs, figures, f"mlp-{dataset}-{activation}", goal)
        parts.append(section)
        summary.append(row)

    data = load_dataset("mnist")
    rows = []
    for batch in (64, 256):
        res = benchmark({"bp": make_rule("bp"), "ftp": make_rule("ftp")},
                        lambda: build_model("mlp", data.input_shape, 10, "1024,128", "tanh"),
                        data.x_train, data.y_train, batch, rounds=budget.rounds_per_repeat,
                        repeats=budget.bench_repeats)
        rows += [[batch, rule, f"{1e3 * r['step_time_median_s']:.3f}", f"{1e3 * r['step_time_iqr_s']:.3f}" if r["step_time_iqr_s"] is not None else "-",
                  report.ratio_cell(r), f"{r['flops_per_sample'] / 2e6:.3f}", f"{r['peak_memory_bytes'] / 2**20:.2f}"]
                 for rule, r in res.items()]
    parts.append("### Step time, MNIST 784-1024-128-10 tanh\n\nGoal: FTP / BP step time <= 1.10 at batch 64 and 256.\n\n"
                 + report.markdown_table(["batch", "rule", "step ms (median)", "IQR ms", "time / BP", "MMAC / sample",
                                          "peak MiB allocated in a step"], rows)
                 + f"\n\n{report.bench_method(budget.bench_repeats, budget.rounds_per_repeat, 20)}. Command: `ftprop "
                 f"bench --rules bp,ftp --dataset mnist --hidden 1024,128 --batch-size 64 --rounds "
                 f"{budget.rounds_per_repeat} --repeats {budget.bench_repeats}` (and 256).\n")
    ratios = {row[0]: row[4] for row in rows if row[1] == "ftp"}
    summary.append(["step time FTP / BP, batch 64 and 256", f"{ratios[64]} and {ratios[256]}", "<= 1.10"])
    return "\n".join(parts), summary


PEERS = ("fa", "dfa", "drtp", "pepita", "dtp", "ff")


def _peers(budget: Budget, runs: Path, figures: Path,
           setups: list[tuple[str, str, str, list[str], str, dict[str, float]]]) -> tuple[str, list[list[str]]]:
    """Every rule in one harness, each with its configs/RULE.toml settings (FTP's too) and the same net, data, epochs,
    batch and seeds. setups: (dataset, hidden, activation, rules, goal, target accuracy per rule); ReLU unless a
    setup says otherwise (Forward-Forward's goodness needs unbounded units)."""
    parts, summary = [], []
    for dataset, hidden, activation, rules, goal, targets in setups:
        base = TrainConfig(dataset=dataset, activation=activation, hidden=hidden, epochs=budget.epochs,
                           schedule="cosine", progress=False)
        key = f"peers-{dataset}-{hidden.replace(',', '-')}" + ("" if activation == "relu" else f"-{activation}")
        section, row = _compare_section(base, rules, budget, runs, figures, key, goal,
                                        {r: CONFIGS / f"{r}.toml" for r in rules if (CONFIGS / f"{r}.toml").exists()},
                                        targets, tuple(r for r in ("pepita", "drtp", "dtp", "ff") if "ftp" in rules))
        parts.append(section)
        summary.append(row)
    return "\n".join(parts), summary


def study_peers_pepita_setup(budget: Budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:
    """Issue 3, the PEPITA setup: one hidden layer of 1024 on MNIST; DRTP and BP again with tanh, the activation of
    DRTP's paper (its hidden signal does not vanish when the output is right, which unbounded ReLU units cannot
    absorb)."""
    return _peers(budget, runs, figures, [
        ("mnist", "1024", "relu", ["bp", "fa", "dfa", "drtp", "pepita"],
         "PEPITA >= 97.8%, FA >= 98.0%, DFA >= 98.0%, DRTP >= 94.5%",
         {"pepita": 97.8, "fa": 98.0, "dfa": 98.0, "drtp": 94.5}),
        ("mnist", "1024", "tanh", ["bp", "drtp"], "DRTP >= 94.5% with the activation of its paper", {"drtp": 94.5})])


PEER_BENCH_BATCH = 64


def study_peers(budget: Budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:
    """Issue 3, the FTP setup: 784-1024-128-10 on MNIST and Fashion-MNIST, every rule; and every rule's step time
    relative to BP, interleaved in one process (the per-epoch seconds of the tables depend on what else ran)."""
    rules = ["bp", *PEERS, "ftp"]
    body, summary = _peers(budget, runs, figures, [
        (dataset, "1024,128", "relu", rules, "DTP >= 97.5%, FF >= 97.0% on MNIST; FTP against PEPITA, DRTP, DTP and FF",
         {"dtp": 97.5, "ff": 97.0} if dataset == "mnist" else {}) for dataset in ("mnist", "fashion-mnist")])
    data = load_dataset("mnist")
    options = {r: c.get("rule", {}) for r, c in repo_rule_configs(rules).items()}
    res = benchmark({r: make_rule(r, **options.get(r, {})) for r in rules},
                    lambda: build_model("mlp", data.input_shape, data.num_classes, "1024,128", "relu"),
                    data.x_train, data.y_train, PEER_BENCH_BATCH, rounds=budget.rounds_per_repeat,
                    repeats=budget.bench_repeats)
    rows = [[r, f"{1e3 * v['step_time_median_s']:.3f}",
             f"{1e3 * v['step_time_iqr_s']:.3f}" if v["step_time_iqr_s"] is not None else "-", report.ratio_cell(v),
             f"{v['flops_per_sample'] / 2e6:.3f}", f"{v['flops_per_sample'] / res['bp']['flops_per_sample']:.3f}"]
            for r, v in res.items()]
    ratio = {r: v["ratio_to_bp"] for r, v in res.items()}
    cheaper = [r for r in ("pepita", "dtp", "ff") if ratio["ftp"] < ratio[r]]
    verdict = (f"FTP / BP = {ratio['ftp']:.3f} ({'meets' if ratio['ftp'] <= 1.10 else 'misses'} <= 1.10); FTP is "
               f"cheaper than {', '.join(cheaper) or 'none'} of PEPITA, DTP, FF"
               + ("" if len(cheaper) == 3 else f" (not than {', '.join(r for r in ('pepita', 'dtp', 'ff') if r not in cheaper)})"))
    body += ("\n### Step time of every rule, MNIST 784-1024-128-10 relu, batch 64\n\nGoal: FTP / BP <= 1.10, and FTP "
             "cheaper than PEPITA, DTP and FF in the same run (published MAC ratios about 1.40, 1.47, 1.87). This table, "
             "not the seconds per epoch of the tables above, is the timing to read: those come from training runs that "
             "may have shared the machine with other runs, this one times every rule in one process, alternating.\n\n"
             + report.markdown_table(["rule", "step ms (median)", "IQR ms", "time / BP", "MMAC / sample",
                                      "MACs / BP"], rows)
             + f"\n\n{report.bench_method(budget.bench_repeats, budget.rounds_per_repeat, 20, 'the rules alternate')}"
             ", each rule with its configs/RULE.toml options (none changes the work of a step, so the "
             "command below, with default options, times the same); MACs from torch.utils.flop_counter. "
             f"Command: `ftprop bench --rules {','.join(rules)} --dataset mnist --hidden 1024,128 --activation relu "
             f"--batch-size {PEER_BENCH_BATCH} --rounds {budget.rounds_per_repeat} --repeats {budget.bench_repeats}`. "
             f"{verdict}.\n")
    summary.append([f"step time / BP, batch {PEER_BENCH_BATCH}",
                    ", ".join(f"{r} {ratio[r]:.2f}" for r in rules if r != "bp"),
                    "FTP <= 1.10 and cheaper than PEPITA, DTP, FF"])
    return body, summary


# (these modules import nothing from this one)
from .study_scaling import hardware_datasets, study_cnn, study_depth, study_hardware  # noqa: E402
from .study_sequences import sequence_datasets, study_sequences  # noqa: E402

MNIST, BOTH = ("mnist",), ("mnist", "fashion-mnist")
STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("mlp", "FTP vs BP on multilayer perceptrons", study_mlp, lambda budget: BOTH),
    Study("peers-pepita-setup", "The peers on PEPITA's setup (784-1024-10)", study_peers_pepita_setup,
          lambda budget: MNIST),
    Study("peers", "FTP and its peers in one harness (784-1024-128-10)", study_peers, lambda budget: BOTH),
    Study("hardware", "Low precision and analog hardware: accuracy against bits and devices", study_hardware,
          hardware_datasets),
    Study("cnn", "Convolutional and residual networks", study_cnn, lambda budget: BOTH),
    Study("depth", "How far FTP scales in depth", study_depth, lambda budget: BOTH),
    Study("alignment", "Alignment of each rule's update with backpropagation", _understanding.study_alignment,
          lambda budget: MNIST),
    Study("gamma", "FTP's gamma and the other open choices", _understanding.study_gamma, lambda budget: BOTH),
    Study("feedback", "The distribution and scale of FTP's projection G", _understanding.study_feedback,
          lambda budget: MNIST),
    Study("label-noise", "Robustness to symmetric label noise", _understanding.study_label_noise,
          lambda budget: BOTH),
    Study("sequences", "Recurrent networks: BPTT, FTP and DFA through time", study_sequences, sequence_datasets),
)}


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def assemble(docs: Path) -> Path:
    """docs/RESULTS.md from the sections the studies wrote, in registry order; a study's full-budget section is
    preferred, so checking the pipeline with --budget small never hides the real figures."""
    sections = [next((p for b in ("full", "small") if (p := docs / "results" / f"{name}.{b}.md").exists()), None)
                for name in STUDIES]
    body = "\n".join(p.read_text() for p in sections if p)
    text = ("# Results\n\nGenerated by `ftprop reproduce` from the run outputs; do not edit by hand (edit the "
            "study in ftprop/reproduce.py and rerun it). Each section names its machine, seeds, date and the command "
            "that reruns it.\n\n" + body)
    out = docs / "RESULTS.md"
    out.write_text(text)
    readme = docs.parent / "README.md"
    summaries = [p.with_suffix(".summary.json") for p in sections if p]
    rows = [row for p in summaries if p.exists() for row in json.loads(p.read_text())]
    if readme.exists() and README_START in readme.read_text():
        head, rest = readme.read_text().split(README_START, 1)
        table = report.markdown_table(["setting", "test accuracy % (mean ± std over seeds) or figure", "goal"], rows)
        readme.write_text(f"{head}{README_START}\n{table}\n\n{README_END}{rest.split(README_END, 1)[1]}")
    return out


def _check_writable(docs: Path, figures: Path) -> None:
    """Refuse a docs folder this process cannot write before any study trains: the sections are written only after
    a study's runs (hours at the full budget), and failing then would leave them unreported."""
    try:
        figures.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--docs {docs}: cannot create {figures} ({err.strerror}); give a writable --docs") from err
    readme = docs.parent / "README.md"  # assemble rewrites its results table, when it has the markers
    targets = [figures, docs, *(p for p in (docs / "RESULTS.md",) if p.exists()),
               *(p for p in (readme,) if p.exists() and README_START in p.read_text())]
    blocked = [str(p) for p in targets if not os.access(p, os.W_OK)]
    if blocked:
        raise ValueError(f"--docs {docs}: cannot write {', '.join(blocked)}; make it writable or give another --docs "
                         "(a scratch folder leaves the checkout's docs and README untouched)")


def _check_datasets(names: list[str], budget: Budget) -> None:
    """Refuse, before any study trains, when data a study of `names` reads at `budget` cannot be found: a study
    loads each dataset only when it reaches the first run that needs it, possibly hours into `reproduce all`. Only
    finds the files (the loaders' own search, whose errors say where they looked and how to get the data)."""
    needed: dict[str, list[str]] = {}  # dataset -> the studies that read it
    for name in names:
        for dataset in STUDIES[name].datasets(budget):
            needed.setdefault(dataset, []).append(name)
    missing = []
    for dataset, studies in needed.items():
        try:
            find_dataset_files(dataset) if dataset in DATASETS else locate_sequence_task(dataset)
        except DatasetError as err:
            missing.append(f"{dataset}, needed by {', '.join(studies)}:\n{textwrap.indent(str(err), '  ')}")
    if missing:
        raise DatasetError(f"{len(missing)} dataset{'s' * (len(missing) > 1)} the studies need at budget "
                           f"{budget.name} cannot be found; no study has started:\n" + "\n".join(missing))


def reproduce(names: list[str], budget: str, runs: Path, docs: Path) -> Path:
    """Run the studies `names` (or all) at `budget`, writing DOCS/results/STUDY.BUDGET.{md,png,summary.json}, then
    DOCS/RESULTS.md and the results table between the markers of DOCS/../README.md (when it has them)."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose small or full")
    # `all` may sit among other names, and a name given twice runs once: a repeat would only retime its tables
    names = list(dict.fromkeys(s for n in names for s in (STUDIES if n == "all" else [n])))
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        raise ValueError(f"unknown study {', '.join(unknown)}; choose from all, {', '.join(STUDIES)}")
    figures = docs / "results"
    _check_writable(docs, figures)
    _check_datasets(names, BUDGETS[budget])
    # the rerun command each section gives names the folders this run used, where they are not the defaults
    folders = "".join(f" --{flag} {path}" for flag, path, default in (("runs", runs, RUNS), ("docs", docs, DOCS))
                      if Path(path) != default)
    for name in names:
        b = BUDGETS[budget]
        started = datetime.datetime.now(datetime.timezone.utc)
        report.clear_runs()
        body, summary = STUDIES[name].run(b, runs / b.name, figures)
        (figures / f"{name}.{b.name}.summary.json").write_text(json.dumps(summary) + "\n")
        header = (f"## {STUDIES[name].title}\n\nStudy `{name}`, budget `{b.name}` (each setting line below gives its "
                  f"epochs and seeds); section generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
                  f"UTC (study started {started:%H:%M}) on {report.machine()}, which also measured any step-time "
                  f"table below; runs read from {runs / b.name}, where finished runs are reused, made on: "
                  f"{report.runs_line('machine') or report.machine()}; code: "
                  f"{report.runs_line('code') or report.code_version()}. "
                  f"Rerun: `ftprop reproduce {name} --budget {b.name}{folders}`.\n\n")
        (figures / f"{name}.{b.name}.md").write_text(header + body)
    return assemble(docs)
