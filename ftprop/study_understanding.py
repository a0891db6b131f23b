"""Studies that explain FTP rather than score it (issue 7): alignment with BP over training, gamma and the other open
choices, the distribution and scale of G, and robustness to label noise.

Each study trains through `run_compare` (finished runs reused, interrupted ones resumed), reads the run outputs
(metrics.json, alignment.jsonl) back, and returns (markdown section, README summary rows) like the studies in
ftprop/reproduce.py, with its PNGs written into the figures folder as NAME.BUDGET.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from . import report
from .bench import alignment_overhead
from .compare import repo_rule_configs, rule_config, run_compare
from .data import load_dataset
from .train import TrainConfig

ALIGN_EVERY = {"small": 25, "full": 100}  # steps between alignment records (the overhead figure is at 100)


# These studies compare settings of one rule (or rules under one perturbation) against each other, so they need a
# complete training schedule, not the longest: the full budget runs 10 epochs (the cosine schedule anneals to zero in
# them) instead of the MLP studies' 30, which fits their ~160 runs into a few hours of the 2-core machine.
EPOCHS = {"full": 10}


def _full(budget) -> bool:  # noqa: ANN001
    return budget.name == "full"


def _epochs(budget) -> int:  # noqa: ANN001
    return EPOCHS.get(budget.name, budget.epochs)


def _base(budget, dataset: str = "mnist", activation: str = "tanh", **kw: Any) -> TrainConfig:  # noqa: ANN001
    return TrainConfig(dataset=dataset, activation=activation, hidden="1024,128", epochs=_epochs(budget),
                       schedule="cosine", progress=False, **kw)


def _accs(runs: Sequence[dict[str, Any]]) -> list[float]:
    return [100 * r["test_accuracy"] for r in runs if not r["diverged"] and r["test_accuracy"] is not None]


def _cell(runs: Sequence[dict[str, Any]]) -> str:
    acc = _accs(runs)
    return report.pct([a / 100 for a in acc]) if acc else "diverged"


def _alignment(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "alignment.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _angle_series(out: Path, rule: str, seeds: int, every: int) -> tuple[list[int], dict[int, list[float]]]:
    """(training steps, block -> angle in degrees, mean over seeds) from the runs' alignment.jsonl.
    Record i was taken before the update of global step i * every (train logs at step % every == 0)."""
    per_seed = [_alignment(out / f"{rule}-seed{s}") for s in range(seeds)]
    n = min((len(r) for r in per_seed), default=0)
    steps = [i * every for i in range(n)]
    blocks = sorted({row["block"] for recs in per_seed for rec in recs[:n] for row in rec["layers"]})

    def mean(values: list[float]) -> float:  # nan where every seed's update of the block was zero (angle None)
        return statistics.fmean(values) if values else math.nan

    series = {b: [mean([row["angle_deg"] for recs in per_seed for row in recs[i]["layers"]
                        if row["block"] == b and row["angle_deg"] is not None]) for i in range(n)] for b in blocks}
    return steps, series


SMOOTH = 5  # table entries average this many alignment records ending at the point (one batch's angle is noisy)


def _window(angles: Sequence[float], i: int) -> float:
    return statistics.fmean(angles[max(0, i - SMOOTH + 1):i + 1])


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _describe(base: TrainConfig, seeds: int) -> str:
    return (f"{base.dataset}, {base.model_label()}, {base.epochs} epochs, batch {base.batch_size}, SGD lr {base.lr} "
            f"momentum {base.momentum}, schedule {base.schedule}, seeds 0..{seeds - 1}")


# ----------------------------------------------------------------------------------------------------- alignment
ALIGN_RULES = ("ftp", "dfa", "fa", "pepita")


def plot_alignment(curves: dict[str, tuple[list[int], dict[int, list[float]]]], path: Path, title: str) -> None:
    """One panel per rule, one line per layer: angle to BP's gradient (degrees) against training step."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), sharey=True, squeeze=False)
    for ax, (rule, (steps, series)) in zip(axes[0], curves.items()):
        for block, angles in series.items():
            ax.plot(steps, angles, marker="." if len(steps) < 30 else None, label=f"layer {block + 1}")
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        top = max((max(a) for a in series.values() if a), default=90)
        ax.set(title=rule, xlabel="training step (batches of 64)", ylim=(0, min(180, max(95, top + 5))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("angle to BP gradient (degrees)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_alignment(budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:  # noqa: ANN001
    """Angle per layer between each rule's update and BP's gradient over training. ReLU, as in the peers study, so
    every rule runs with its configs/RULE.toml settings (tuned there on ReLU) and the accuracies are comparable."""
    every = ALIGN_EVERY.get(budget.name, 100)
    base = _base(budget, activation="relu", log_alignment=every)
    rules = list(ALIGN_RULES)
    configs = repo_rule_configs(rules)
    key = "alignment-mnist"
    comparison = run_compare(base, rules, budget.seeds, runs / key, resume=True, rule_configs=configs)
    curves = {r: _angle_series(runs / key, r, budget.seeds, every) for r in rules}
    figure = f"alignment.{budget.name}.png"
    plot_alignment(curves, figures / figure, f"angle between each rule's update and BP's gradient, "
                                             f"{base.dataset} {base.model_label()}")
    n = min(len(steps) for steps, _ in curves.values())
    points = sorted({0, n // 4, n // 2, n - 1}) if n else []
    rows, summary_bits = [], []
    for rule, (steps, series) in curves.items():
        for block, angles in series.items():
            rows.append([rule, f"layer {block + 1}", *(f"{_window(angles, i):.1f}" for i in points)])
        if series:
            hidden = [_window(angles, points[-1]) for b, angles in series.items() if b < max(series)]
            if hidden:
                summary_bits.append(f"{rule} {statistics.fmean(hidden):.0f}°")
    header = ["rule", "layer", *(f"step {curves[rules[0]][0][i]}" for i in points)]
    data = load_dataset(base.dataset, base.data_dir, val_size=base.val_size)
    cost = {r: alignment_overhead(rule_config(base, r, configs.get(r)), data, every,
                                  rounds=budget.bench_rounds) for r in rules}
    worst = max(cost, key=lambda r: cost[r]["overhead"])
    cost_rows = [[r, f"{c['epoch_s_off']:.3f}", f"{c['epoch_s_on']:.3f}", f"{100 * c['overhead']:+.1f}%"]
                 for r, c in cost.items()]
    command = (f"ftprop compare --rules {','.join(rules)} --dataset mnist --hidden 1024,128 --activation relu "
               f"--epochs {base.epochs} --schedule cosine --seeds {budget.seeds} --log-alignment {every} "
               f"--out runs/{key}" + "".join(f" --rule-config {r}=configs/{r}.toml" for r in configs))
    text = (f"### Alignment with backpropagation, MNIST\n\n{_describe(base, budget.seeds)}; per-rule settings from "
            f"configs/. Every {every} steps the rule's update and BP's exact gradient on the same batch are compared "
            "per layer (all the layer's parameters); angle in degrees, mean over seeds (0 = BP's direction, "
            f"90 = orthogonal), each entry the mean of the last {SMOOTH} records up to that step. The last layer is "
            "the output layer.\n\n"
            + report.markdown_table(header, rows)
            + "\n\nTest accuracy: " + "; ".join(f"{r} {_cell(v)}" for r, v in comparison.results.items())
            + f".\n\nCommand: `{command}`\n\n![alignment over training](results/{figure})\n\n"
            f"#### What logging costs\n\nTraining epochs of {cost[worst]['steps_per_epoch']} steps with alignment "
            f"logged every {every} steps against none, same seed and batches, median of {budget.bench_rounds} "
            f"alternating rounds per rule, in this run ({report.machine()}):\n\n"
            + report.markdown_table(["rule", "epoch s (off)", "epoch s (logging)", "overhead"], cost_rows)
            + f"\n\nCommand: `ftprop bench --rules {','.join(rules)} --hidden 1024,128 --activation relu "
            f"--log-alignment {every} --rounds {budget.bench_rounds}` (rule options from configs/ as above).\n")
    summary = [["alignment, MNIST 1024-128 relu: mean hidden-layer angle to BP at the end",
                "; ".join(summary_bits) or "-", "angles < 90° (the rule descends)"],
               [f"alignment logging every {every} steps: largest training-time overhead",
                f"{100 * cost[worst]['overhead']:+.1f}% ({worst})", "<= 10% at 100 steps"]]
    return text, summary


# ----------------------------------------------------------------------------------------------------- gamma
def gamma_grid(full: bool) -> list[float]:
    n = 7 if full else 3
    return [float(f"{10 ** (-2 + 2 * i / (n - 1)):.3g}") for i in range(n)]  # 0.01 .. 1, log-spaced


def flat_range(gammas: Sequence[float], means: Sequence[float | None], tol: float = 0.3) -> tuple[int, int] | None:
    """The widest run of consecutive grid values (no divergence) whose mean accuracies span less than `tol` points;
    ties go to the run nearer the default 0.1. None if no two neighbours qualify."""
    best = None
    for i in range(len(gammas)):
        for j in range(i + 1, len(gammas)):
            vals = means[i:j + 1]
            if any(v is None for v in vals) or max(vals) - min(vals) >= tol:
                break
            width = j - i
            near = min(abs(math.log10(g) + 1) for g in gammas[i:j + 1])
            if best is None or width > best[0] or (width == best[0] and near < best[1]):
                best = (width, near, i, j)
    return None if best is None else (best[2], best[3])


def plot_gamma(data: dict[str, tuple[list[float], list[list[float]]]], path: Path, title: str) -> None:
    """Test accuracy against gamma (log x), one panel per dataset; mean over seeds with a min..max error bar."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 3.8), squeeze=False)
    for ax, (dataset, (gammas, accs)) in zip(axes[0], data.items()):
        pts = [(g, a) for g, a in zip(gammas, accs) if a]
        if pts:
            g, a = zip(*pts)
            mean = [statistics.fmean(v) for v in a]
            ax.errorbar(g, mean, yerr=[[m - min(v) for m, v in zip(mean, a)], [max(v) - m for m, v in zip(mean, a)]],
                        marker="o", capsize=4, label="FTP (mean, min..max over seeds)")
        ax.axvline(0.1, color="grey", ls="--", lw=0.8, label="default gamma 0.1")
        ax.set(xscale="log", xlabel="gamma (log scale)", ylabel="test accuracy (%)", title=dataset)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OPEN_CHOICES = (("gamma_mode", "multiplier"), ("target_nonlin", "tanh"), ("fprime", False), ("update_input", "t"),
                ("tangent", False))


def _ftp(base: TrainConfig, options: dict[str, Any], budget, out: Path) -> list[dict[str, Any]]:  # noqa: ANN001
    cfg = dataclasses.replace(base, rule="ftp", rule_options=options)
    return run_compare(cfg, ["ftp"], budget.seeds, out, resume=True).results["ftp"]


def _opts(options: dict[str, Any]) -> str:
    return " ".join(f"--rule-opt {k}={v}" for k, v in options.items())


def study_gamma(budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:  # noqa: ANN001
    """FTP's accuracy and stability over a log-spaced gamma grid (MNIST, Fashion-MNIST, tanh), then the other open
    choices of docs/ALGORITHM.md one at a time against the default."""
    gammas = gamma_grid(_full(budget))
    if 0.1 not in gammas:
        gammas = sorted({*gammas, 0.1})
    rows, plot, means = [], {}, {}
    for dataset in ("mnist", "fashion-mnist"):
        base = _base(budget, dataset)
        per_gamma = [_ftp(base, {"gamma": g}, budget, runs / f"gamma-{dataset}-{g:g}") for g in gammas]
        plot[dataset] = (gammas, [_accs(r) for r in per_gamma])
        means[dataset] = [statistics.fmean(_accs(r)) if _accs(r) else None for r in per_gamma]
        for g, r in zip(gammas, per_gamma):
            acc = _accs(r)
            rows.append([dataset, f"{g:g}", _cell(r), f"{min(acc):.2f} .. {max(acc):.2f}" if acc else "-",
                         f"{sum(1 for x in r if x['diverged'])}/{len(r)}"])
    figure = f"gamma.{budget.name}.png"
    plot_gamma(plot, figures / figure, f"FTP test accuracy against gamma, mlp 1024-128 tanh, {_epochs(budget)} epochs")
    span = flat_range(gammas, means["mnist"])
    if span:
        i, j = span
        vals = means["mnist"][i:j + 1]
        flat = (f"MNIST accuracy varies by less than 0.3 points (spread {max(vals) - min(vals):.2f} points, mean "
                f"over seeds) for gamma in [{gammas[i]:g}, {gammas[j]:g}] ({j - i + 1} grid values); the default "
                f"0.1 is {'inside' if gammas[i] <= 0.1 <= gammas[j] else 'outside'} this range.")
    else:
        flat = "No two neighbouring gamma values give MNIST accuracies within 0.3 points of each other."

    base = _base(budget, "mnist")
    default = next(r for g, r in zip(gammas, plot["mnist"][1]) if g == 0.1)
    choice_rows = [["default (gamma 0.1)", report.pct([a / 100 for a in default]) if default else "diverged", "-",
                    f"`{_opts({'gamma': 0.1})}`"]]
    for option, value in OPEN_CHOICES:
        r = _ftp(base, {"gamma": 0.1, option: value}, budget, runs / f"gamma-choice-{option}-{value}")
        acc = _accs(r)
        delta = f"{statistics.fmean(acc) - statistics.fmean(default):+.2f}" if acc and default else "-"
        choice_rows.append([f"{option} = {value}", _cell(r), delta, f"`{_opts({'gamma': 0.1, option: value})}`"])
    command = (f"ftprop compare --rules ftp --dataset DATASET --hidden 1024,128 --activation tanh --epochs "
               f"{_epochs(budget)} --schedule cosine --seeds {budget.seeds} --gamma GAMMA --out runs/gamma-DATASET-GAMMA")
    setting = _describe(base, budget.seeds).replace("mnist, ", "MNIST and Fashion-MNIST, ", 1)
    text = (f"### FTP's gamma\n\n{setting}; gamma on a log-spaced grid {', '.join(f'{g:g}' for g in gammas)}.\n\n"
            + report.markdown_table(["dataset", "gamma", "test acc % (mean ± std)", "min .. max %", "diverged"], rows)
            + f"\n\n**{flat}**\n\nCommand: `{command}`\n\n![accuracy against gamma](results/{figure})\n\n"
            "#### The other open choices (MNIST, one change at a time from the default)\n\n"
            + report.markdown_table(["variant", "test acc % (mean ± std)", "Δ vs default (points)", "flags"],
                                    choice_rows) + "\n")
    summary = [["FTP gamma range with MNIST accuracy spread < 0.3 points",
                f"[{gammas[span[0]]:g}, {gammas[span[1]]:g}]" if span else "none", "a range containing the default"]]
    return text, summary


# ----------------------------------------------------------------------------------------------------- feedback
def feedback_variants(full: bool) -> list[dict[str, Any]]:
    variants = [{"g_dist": d, "g_scale": 0.1} for d in ("gaussian", "uniform", "sparse", "orthogonal")]
    scales = (0.01, 0.03, 0.3, 1.0) if full else (0.03, 0.3)
    return variants + [{"g_dist": "gaussian", "g_scale": s} for s in scales]


def _label(v: dict[str, Any]) -> str:
    extra = f" (density {v.get('g_density', 0.1)})" if v["g_dist"] == "sparse" else ""
    return f"{v['g_dist']}{extra}, scale {v['g_scale']:g}"


def plot_feedback(labels: list[str], accs: list[list[float]], angles: list[dict[int, float]], path: Path,
                  title: str) -> None:
    """Left: test accuracy per G variant (mean, min..max bar); right: final angle to BP per hidden layer."""
    plt = _plt()
    fig, (ax_acc, ax_ang) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = list(range(len(labels)))
    mean = [statistics.fmean(a) if a else float("nan") for a in accs]
    err = [[m - min(a) if a else 0 for m, a in zip(mean, accs)], [max(a) - m if a else 0 for m, a in zip(mean, accs)]]
    ax_acc.bar(xs, mean, yerr=err, capsize=4, color="tab:blue")
    lows, highs = [min(a) for a in accs if a], [max(a) for a in accs if a]
    if lows:
        ax_acc.set_ylim(max(0, min(lows) - 2), min(100, max(highs) + 1))
    ax_acc.set(ylabel="test accuracy (%)", title="accuracy")
    blocks = sorted({b for a in angles for b in a})
    width = 0.8 / max(1, len(blocks))
    for k, b in enumerate(blocks):
        ax_ang.bar([x + (k - (len(blocks) - 1) / 2) * width for x in xs], [a.get(b, float("nan")) for a in angles],
                   width, label=f"layer {b + 1}")
    top = max((v for a in angles for v in a.values()), default=90)
    ax_ang.set(ylabel="angle to BP gradient at the end (degrees)", title="final alignment",
               ylim=(0, min(180, max(95, top + 5))))
    ax_ang.legend(fontsize=8)
    for ax in (ax_acc, ax_ang):
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_feedback(budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:  # noqa: ANN001
    """G drawn Gaussian, uniform, sparse (10% nonzero) and orthogonal at the default scale, and Gaussian at other
    scales: accuracy and the final angle of each layer's update to BP's gradient."""
    every = ALIGN_EVERY.get(budget.name, 100)
    base = _base(budget, log_alignment=every)
    rows, labels, accs, angles = [], [], [], []
    for v in feedback_variants(_full(budget)):
        key = f"feedback-{v['g_dist']}-{v['g_scale']:g}"
        r = _ftp(base, dict(v), budget, runs / key)
        _, series = _angle_series(runs / key, "ftp", budget.seeds, every)
        # hidden layers only: the output layer gets the exact cross-entropy gradient
        final = {b: _window(a, len(a) - 1) for b, a in series.items() if a and b < max(series)}
        labels.append(_label(v))
        accs.append(_accs(r))
        angles.append(final)
        rows.append([_label(v), _cell(r), *(f"{final[b]:.1f}" if b in final else "-" for b in (0, 1)),
                     f"{sum(1 for x in r if x['diverged'])}/{len(r)}", f"`{_opts(v)}`"])
    figure = f"feedback.{budget.name}.png"
    plot_feedback(labels, accs, angles, figures / figure, f"FTP with different G, {base.dataset} {base.model_label()}")
    best = max(zip(labels, accs), key=lambda la: statistics.fmean(la[1]) if la[1] else -1)
    text = (f"### The fixed projection G\n\n{_describe(base, budget.seeds)}. Sparse G keeps a fraction g_density "
            "(0.1) of its entries, orthogonal G has orthonormal rows; both are scaled so that the entries' standard "
            "deviation is g_scale. Angles: between FTP's update and BP's gradient per hidden layer, mean of the last "
            f"{SMOOTH} alignment records (one every {every} steps) and over seeds.\n\n"
            + report.markdown_table(["G", "test acc % (mean ± std)", "layer 1 angle °", "layer 2 angle °",
                                     "diverged", "flags"], rows)
            + f"\n\nCommand: `ftprop compare --rules ftp --dataset mnist --hidden 1024,128 --activation tanh "
              f"--epochs {_epochs(budget)} --schedule cosine --seeds {budget.seeds} --log-alignment {every} "
              f"--rule-opt g_dist=DIST --g-scale SCALE`\n\n![accuracy and alignment per G](results/{figure})\n")
    summary = [["FTP feedback G, MNIST 1024-128 tanh: best variant",
                f"{best[0]} {report.pct([a / 100 for a in best[1]]) if best[1] else '-'}", "compare G choices"]]
    return text, summary


# ----------------------------------------------------------------------------------------------------- label noise
NOISE_RULES = ("bp", "ftp", "dfa")


def noise_levels(full: bool) -> list[float]:
    return [0.0, 0.2, 0.4, 0.6] if full else [0.0, 0.6]  # small: the two ends, half the runs


def plot_noise(data: dict[str, dict[str, list[tuple[float, list[float]]]]], path: Path, title: str) -> None:
    """Test accuracy (clean test labels) against the training-label noise, one panel per dataset, line per rule."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 3.8), squeeze=False)
    for ax, (dataset, by_rule) in zip(axes[0], data.items()):
        for rule, points in by_rule.items():
            pts = [(100 * p, a) for p, a in points if a]
            if not pts:
                continue
            x, a = zip(*pts)
            mean = [statistics.fmean(v) for v in a]
            ax.errorbar(x, mean, yerr=[[m - min(v) for m, v in zip(mean, a)], [max(v) - m for m, v in zip(mean, a)]],
                        marker="o", capsize=4, label=rule)
        ax.set(xlabel="training labels replaced by another class (%)", ylabel="test accuracy (%), clean labels",
               title=dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_label_noise(budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:  # noqa: ANN001
    """Symmetric label noise on the training labels only (ftprop.train.noisy_labels), BP, FTP and DFA."""
    levels = noise_levels(_full(budget))
    rules = list(NOISE_RULES)
    configs = repo_rule_configs(rules)
    plot: dict[str, dict[str, list[tuple[float, list[float]]]]] = {}
    parts, summary = [], []
    for dataset in ("mnist", "fashion-mnist"):
        plot[dataset] = {r: [] for r in rules}
        table = {r: [] for r in rules}
        for p in levels:
            base = _base(budget, dataset, label_noise=p)
            comparison = run_compare(base, rules, budget.seeds, runs / f"noise-{dataset}-{round(100 * p)}",
                                     resume=True, rule_configs=configs)
            for r in rules:
                plot[dataset][r].append((p, _accs(comparison.results[r])))
                table[r].append(_cell(comparison.results[r]))
        rows = [[r, *table[r]] for r in rules]
        parts.append(f"#### {dataset}\n\n" + report.markdown_table(
            ["rule", *(f"{round(100 * p)}% noise" for p in levels)], rows) + "\n")
        drop = {r: (statistics.fmean(plot[dataset][r][0][1]) - statistics.fmean(plot[dataset][r][-1][1]))
                if plot[dataset][r][0][1] and plot[dataset][r][-1][1] else None for r in rules}
        summary.append([f"label noise {round(100 * levels[-1])}%, {dataset}: accuracy lost (points)",
                        "; ".join(f"{r} {d:.2f}" if d is not None else f"{r} -" for r, d in drop.items()),
                        "measured (no target in the issue)"])
    figure = f"label-noise.{budget.name}.png"
    base = _base(budget)
    plot_noise(plot, figures / figure, f"symmetric training-label noise, {base.model_label()}, {_epochs(budget)} epochs")
    text = (f"### Symmetric label noise\n\n{_describe(base, budget.seeds)}; rules with their configs/RULE.toml "
            "settings. A fraction p of the training labels (exactly round(p N), the same for every rule at a given "
            "seed) is replaced by a uniformly random other class; validation and test labels are clean. Test "
            "accuracy % (mean ± std over seeds) after the last epoch.\n\n" + "\n".join(parts)
            + f"\nCommand: `ftprop compare --rules {','.join(rules)} --dataset DATASET --hidden 1024,128 "
              f"--activation tanh --epochs {_epochs(budget)} --schedule cosine --seeds {budget.seeds} --label-noise P"
              + "".join(f" --rule-config {r}=configs/{r}.toml" for r in configs)
            + f"`\n\n![accuracy against label noise](results/{figure})\n")
    return text, summary
