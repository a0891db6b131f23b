"""Tables and plots from run outputs: the only place results are formatted."""
from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch


def machine() -> str:
    """One line naming where figures were measured, printed beside every table."""
    threads = torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {threads} torch threads{gpu}, torch {torch.__version__}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: Sequence[float]) -> str:
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f} ± {s:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """results[rule] = list of per-seed summaries (metrics.json contents)."""
    rows = []
    for rule, runs in results.items():
        ok = [r for r in runs if not r["diverged"]]
        rows.append([
            rule,
            pct([r["test_accuracy"] for r in ok]) if ok else "diverged",
            pct([r["best_val_accuracy"] for r in ok if r["best_val_accuracy"] is not None]) if ok else "-",
            f"{statistics.median(r['seconds_per_epoch'] for r in ok):.2f}" if ok else "-",
            f"{len(ok)}/{len(runs)}",
        ])
    return markdown_table(["rule", "test acc % (mean ± std)", "best val acc %", "s / epoch (median)", "runs ok"], rows)


def plot_curves(histories: dict[str, list[list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Test accuracy and training loss per epoch; line = mean over seeds, band = min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for rule, runs in histories.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        n = min(len(r) for r in runs)
        epochs = list(range(1, n + 1))
        for ax, key, scale in ((ax_acc, "test_accuracy", 100.0), (ax_loss, "train_loss", 1.0)):
            per_epoch = [[scale * r[i][key] for r in runs] for i in range(n)]
            mean = [statistics.fmean(v) for v in per_epoch]
            line, = ax.plot(epochs, mean, label=f"{rule} ({len(runs)} seeds)")
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.2)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
