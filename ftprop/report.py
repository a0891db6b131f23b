"""Tables and plots from run outputs: the only place results are formatted."""
from __future__ import annotations

import collections
import functools
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

from . import runtime


@functools.cache
def _cpu() -> str:
    """The CPU's model name and the vector instructions torch's kernels use. Step-time ratios depend on the host, not
    only on the code: the residual CNN's BP step took 50 ms on the 2-core box of one session and 19 ms on the AVX-512
    box of the next, where FTP's memory-bound elementwise work weighs more against the faster convs."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def machine() -> str:
    """One line naming where figures were measured, printed beside every table."""
    threads = torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()} ({_cpu()}), {threads} torch threads{gpu}, torch {torch.__version__}, "
            f"malloc {runtime.MALLOC}")


@functools.cache
def code_version() -> str:
    """Which code makes a run: `git <commit>` of the checkout ftprop is imported from, `+dirty` when the package's
    tracked sources differ from that commit, or `ftprop <version>` for an installed copy outside git.

    Conv runs are chaotic: a change in floating-point summation order changes a seeded run from its first epoch
    (docs/ALGORITHM.md), and `ftprop reproduce` reuses finished runs by their config alone, so every run records the
    code that made it and each RESULTS.md section lists those versions.
    """
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package.parent), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:  # the package must be the top of its own checkout, not a copy that happens to sit inside another repo
        if Path(git("rev-parse", "--show-toplevel")).resolve() == package.parent:
            dirty = git("status", "--porcelain", "--untracked-files=no", "--", package.name)
            return f"git {git('rev-parse', '--short=7', 'HEAD')}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    from . import __version__
    return f"ftprop {__version__}"


# Where the runs a study's tables are built from came from (count_run): their code versions and machines, read
# back for its RESULTS.md header. A study reuses finished runs, which another checkout or machine may have made, so
# the header lists what the runs recorded rather than the machine that assembles the section.
RUN_SOURCES: dict[str, collections.Counter[str]] = {"code": collections.Counter(), "machine": collections.Counter()}


def count_run(record: dict[str, Any]) -> None:
    """Note the code version and machine one run recorded (its config.json or summary); runs made before these
    were recorded count as such."""
    for field, seen in RUN_SOURCES.items():
        seen[recorded(record, field)] += 1


def clear_runs() -> None:
    """Forget the runs noted so far (a study starts afresh)."""
    for seen in RUN_SOURCES.values():
        seen.clear()


def counts_line(seen: collections.Counter[str]) -> str:
    """'git abc1234 (12 runs), ...': counted values, most runs first."""
    return ", ".join(f"{value} ({n} run{'s' if n > 1 else ''})" for value, n in seen.most_common())


def runs_line(field: str) -> str:
    """The values of `field` ("code" or "machine") noted since the last clear_runs, as counts_line writes them."""
    return counts_line(RUN_SOURCES[field])


def recorded(record: dict[str, Any], field: str) -> str:
    """The code version or machine (`field`) a run's config.json or summary recorded, or that it was made before
    that was recorded."""
    return record.get(field) or "not recorded (older run)"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ratio_range(span: tuple[float, float] | None) -> str:
    """' (1.02-1.21)': the range of a time ratio over benchmark repeats, '' when there was one repeat."""
    return "" if span is None else f" ({span[0]:.3f}-{span[1]:.3f})"


def ratio_cell(r: dict[str, Any]) -> str:
    """A benchmark entry's time / BP with its range over repeats (bench.benchmark)."""
    return f"{r['ratio_to_bp']:.3f}{ratio_range(r['ratio_range'])}"


def bench_method(repeats: int, rounds: int, steps: int, alternate: str = "BP and FTP alternate") -> str:
    """How a step-time table of bench.benchmark with `repeats` was measured, for the text below the table."""
    return (f"{repeats} repeats, each with fresh models, of {rounds} interleaved rounds of {steps} steps ({alternate}), "
            "one SGD step included; a step time is the median of the repeats' medians (IQR over all rounds), time / BP "
            "the median of the repeats' ratios with their range in brackets")


def spread(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± std' over runs, or 'value (1 run)': one run has no spread to show, and '± 0.00' read as a measured
    spread of zero (every small-budget table has one seed)."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f} (1 run)"


def pct(values: Sequence[float]) -> str:
    return spread([100 * v for v in values])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


COMPARE_NOTE = ("s / epoch: each run's median training time per epoch as it ran (runs of one table may have run at "
                "different times, alone or beside other jobs, and finished runs are reused, so it describes the runs and "
                "does not compare the rules); step time / BP: one training step of each rule (SGD step included) timed "
                "side by side in one process when the table was made, on the table's model and batch size: {repeats} "
                "set(s) of fresh models, each timed for {rounds} rounds of {steps} steps with the rules alternating; the "
                "median of the sets' ratios, with their range.")


def compare_table(results: dict[str, list[dict[str, Any]]], costs: dict[str, dict[str, Any]] | None = None) -> str:
    """results[rule] = per-seed summaries (metrics.json contents); costs[rule] = bench.benchmark's figures for one
    training step (FLOPs, peak memory and, when it timed steps, time / BP). Ratios are to BP when BP is among the rules.

    Time / BP comes only from the side-by-side step timing, never from the runs' wall time: runs reused from other
    sessions or run beside other jobs once gave the residual CNN 3.85x BP per epoch where the interleaved benchmark
    measured 1.09x.
    """
    def ratio(rule: str, value: float | None, of: dict[str, float | None]) -> str:
        return f"{value / of['bp']:.2f}" if value is not None and of.get("bp") else "-"

    ok = {rule: [r for r in runs if not r["diverged"]] for rule, runs in results.items()}
    sec = {rule: statistics.median(r["seconds_per_epoch"] for r in runs) if runs else None for rule, runs in ok.items()}
    timed = bool(costs) and "bp" in results and all(c.get("ratio_to_bp") is not None for c in costs.values())
    header = ["rule", "test acc % (mean ± std)", "best val acc %", "s / epoch (median, as run)"]
    if timed:
        header.append("step time / BP")
    if costs:
        header += ["MFLOP / sample", "FLOPs / BP", "peak MiB / step", "memory / BP"]
        flops = {r: c["flops_per_sample"] for r, c in costs.items()}
        mem = {r: c["peak_memory_bytes"] for r, c in costs.items()}
    header.append("runs ok")
    rows = []
    for rule, runs in results.items():
        good = ok[rule]
        row = [rule,
               pct([r["test_accuracy"] for r in good]) if good else "diverged",
               pct(vals) if (vals := [r["best_val_accuracy"] for r in good if r["best_val_accuracy"] is not None])
               else "-",  # no validation split (--val-size 0), or every run diverged
               f"{sec[rule]:.2f}" if sec[rule] is not None else "-"]
        if timed:
            row.append(ratio_cell(costs[rule]))
        if costs:
            row += [f"{flops[rule] / 1e6:.3f}", ratio(rule, flops[rule], flops),
                    f"{mem[rule] / 2**20:.2f}", ratio(rule, mem[rule], mem)]
        row.append(f"{len(good)}/{len(runs)}")
        rows.append(row)
    table = markdown_table(header, rows)
    if timed:
        any_cost = next(iter(costs.values()))
        table += "\n\n" + COMPARE_NOTE.format(repeats=any_cost["repeats"], rounds=any_cost["rounds"],
                                               steps=any_cost["steps_per_round"])
    return table


CURVES = (("test_accuracy", 100.0), ("train_loss", 1.0))  # what curves.png draws, and its scale


def curve_series(histories: dict[str, list[list[dict[str, Any]]]],
                 results: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, dict[str, Any]]:
    """Per rule, what plot_curves draws: {"label", "epochs", key: (mean, min, max) per epoch} over the rule's runs.

    Runs that diverged (their summary in `results`, per seed in the order of `histories`) are left out, as
    compare_table leaves them out of its mean: kept, a run that diverged in epoch 2 of 30 cut every seed's curve to
    its one good epoch and pulled that epoch's mean away from the table's. A rule whose runs all diverged has no
    curve.
    """
    series = {}
    for rule, runs in histories.items():
        summaries = (results or {}).get(rule) or [{} for _ in runs]
        kept = [r for r, s in zip(runs, summaries) if r and not s.get("diverged")]
        if not kept:
            continue
        left_out = sum(bool(s.get("diverged")) for s in summaries)
        n = min(len(r) for r in kept)
        entry: dict[str, Any] = {
            "label": f"{rule} ({len(kept)} seeds" + (f"; {left_out} diverged, not shown" if left_out else "") + ")",
            "epochs": list(range(1, n + 1))}
        for key, scale in CURVES:
            per_epoch = [[scale * r[i][key] for r in kept] for i in range(n)]
            entry[key] = ([statistics.fmean(v) for v in per_epoch], [min(v) for v in per_epoch],
                          [max(v) for v in per_epoch])
        series[rule] = entry
    return series


def plot_curves(histories: dict[str, list[list[dict[str, Any]]]], path: Path, title: str,
                results: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Test accuracy and training loss per epoch; line = mean over seeds, band = min..max (curve_series: runs that
    diverged per `results` left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    axes = {"test_accuracy": ax_acc, "train_loss": ax_loss}
    for curve in curve_series(histories, results).values():
        for key, ax in axes.items():
            mean, lo, hi = curve[key]
            line, = ax.plot(curve["epochs"], mean, label=curve["label"])
            ax.fill_between(curve["epochs"], lo, hi, color=line.get_color(), alpha=0.2)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:  # every run diverged: no curve to name
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
