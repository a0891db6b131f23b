"""The `sequences` study (issue 5), for `ftprop reproduce`: BPTT, FTP and DFA through time on recurrent nets.

Tasks: the adding problem at T = 50 and 100, the temporal-order problem (4 classes, T = 100), ETTh1 forecasting at
horizon 96 (with the linear look-back-to-horizon baseline) and the statsmodels co2 series, each on a GRU (1 x 64,
Adam lr 1e-3, batch 64); then the adding problem and ETTh1 again on a minGRU of the same size, whose elementwise
recurrence makes the forward-only temporal credit of inject="final" exact. Every task trains every rule on the same
data and seeds, and measures the cost per training sequence in the same process. Each task's results (results.json)
and its seed-0 models (models.pt) are kept in the runs directory and reused when the configuration is unchanged.
Plots: learning curves per task, and predicted vs true ETTh1 series. Whether each goal holds is computed from the
numbers, never typed.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import report
from .recurrent import RecurrentNet
from .seqtrain import SeqConfig, results_table, run_sequences
from .sequences import SYNTHETIC_TASKS, SeqData

if TYPE_CHECKING:  # reproduce imports this module; only the type is needed here
    from .reproduce import Budget

# "ftp" is recurrent FTP as the paper reads (the nudge carried forward by a second pass in time); "ftp:inject=final"
# the forward-only variant that credits each step with the final state's target through the unit's own carry
# (docs/ALGORITHM.md, "Recurrent networks"): both are reported, each against the goals.
RULES = ["bptt", "ftp", "ftp:inject=final", "dfa"]
# (key, config, goal); epochs are scaled by the budget (full: as given; smaller budgets: `Budget.epochs` at most)
SETUPS: list[tuple[str, SeqConfig, str]] = [
    ("adding-T50", SeqConfig(task="adding", T=50, epochs=30), "FTP test MSE < 0.05 and <= 2x BPTT's"),
    ("adding-T100", SeqConfig(task="adding", T=100, epochs=30), "FTP test MSE < 0.05 and <= 2x BPTT's"),
    ("order-T100", SeqConfig(task="order", T=100, classes=4, epochs=30), "FTP against BPTT (no numeric goal)"),
    ("etth1-96", SeqConfig(task="ett", horizon=96, epochs=20), "FTP test MSE within 10% of BPTT's"),
    ("co2", SeqConfig(task="co2", epochs=30), "FTP against BPTT and the linear baseline (no numeric goal)"),
    # the adding problem on an elementwise recurrence, where a unit's own carry is its whole path in time, so that
    # inject="final" has BPTT's exact temporal credit and only its random projection differs (docs/ALGORITHM.md)
    ("adding-T50-mingru", SeqConfig(task="adding", T=50, epochs=30, cell="mingru"),
     "FTP test MSE < 0.05 and <= 2x BPTT's"),
    ("adding-T100-mingru", SeqConfig(task="adding", T=100, epochs=30, cell="mingru"),
     "FTP test MSE < 0.05 and <= 2x BPTT's"),
    ("etth1-96-mingru", SeqConfig(task="ett", horizon=96, epochs=20, cell="mingru"),
     "FTP test MSE within 10% of BPTT's"),
]


def sequence_datasets(budget: Budget) -> tuple[str, ...]:
    """The tasks of SETUPS that read files (for `ftprop reproduce` to find before anything trains), at any budget:
    a budget changes only the epochs."""
    return tuple(dict.fromkeys(cfg.task for _, cfg, _ in SETUPS if cfg.task not in SYNTHETIC_TASKS))


def _run(cfg: SeqConfig, seeds: int, bench_rounds: int, where: Path) -> tuple[dict[str, Any], dict[str, RecurrentNet],
                                                                            SeqData]:
    """Results and seed-0 models of every rule; a rule's runs are reused from `where` when they were made with this
    config, seeds and timing rounds, so adding a rule trains only that rule (the cost is then re-measured for all
    rules together, in one process)."""
    data = cfg.load()
    key = {"config": dataclasses.asdict(cfg), "seeds": seeds, "bench_rounds": bench_rounds}
    results_path, models_path = where / "results.json", where / "models.pt"
    saved, models = None, {}
    if results_path.exists() and models_path.exists():
        try:  # through the dataclass, so that a field added since takes its default, which older runs had
            saved = json.loads(results_path.read_text())
            saved["key"]["config"] = dataclasses.asdict(SeqConfig(**saved["key"]["config"]))
        except (KeyError, TypeError, ValueError):  # no key, one this code's config cannot hold, or damaged JSON
            # (JSONDecodeError is a ValueError): not reusable, the task is trained again
            print(f"{results_path} is not reusable by this code; training the task again", file=sys.stderr)
            saved = None
        if saved is None or saved["key"] != key:
            saved = None
        else:
            models = _load_models(models_path, cfg, data)
    if saved and list(saved["runs"]) == RULES and all(r in models for r in RULES):
        _count_runs(saved)
        return saved, models, data
    done = {r: runs for r, runs in saved["runs"].items() if r in RULES and r in models} if saved else {}
    results, trained = run_sequences(cfg, RULES, seeds, bench_rounds, data, done)
    models = {r: trained[r] if r in trained else models[r] for r in RULES}  # trained: the rules not in done
    results["key"] = key
    where.mkdir(parents=True, exist_ok=True)
    torch.save({rule: m.state_dict() for rule, m in models.items()}, models_path)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    _count_runs(results)
    return results, models, data


# What torch.load raises on a file that torch.save did not write whole: a zip archive cut short or altered (RuntimeError
# from its reader), an empty file (EOFError), or other bytes, which the weights-only unpickler rejects
# (UnpicklingError) or trips over (KeyError, IndexError, UnicodeDecodeError); OSError: the file cannot be read at all.
_UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError, IndexError, UnicodeDecodeError)


def _load_models(path: Path, cfg: SeqConfig, data: SeqData) -> dict[str, RecurrentNet]:
    """The models saved in `path`, or none, with a one-line note naming the file, when it is damaged (a bad copy of the
    versioned runs) or holds other models than this code builds from `cfg`: as for a damaged results.json, the task is
    then trained again and the file rewritten, rather than the study stopping on torch's unpickling error or
    state_dict traceback."""
    def unusable(why: str) -> dict[str, RecurrentNet]:
        print(f"{path} is not reusable by this code ({why}); training the task again", file=sys.stderr)
        return {}

    try:
        states = torch.load(path, weights_only=True)
    except _UNREADABLE as err:  # torch's own text is a paragraph advising weights_only=False: only the type is kept
        return unusable(f"torch cannot read it: {type(err).__name__}")
    if not isinstance(states, dict):
        return unusable(f"it holds a {type(states).__name__}, not the rules' models")
    models = {}
    for rule, state in states.items():
        models[rule] = cfg.build(data)
        try:
            models[rule].load_state_dict(state)
        except (RuntimeError, TypeError) as err:  # other keys or shapes than this code's model; not a state dict
            lines = str(err).splitlines()  # torch's heading and a line per parameter: the first one says enough
            return unusable(f"{rule}: " + " ".join(line.strip() for line in lines[:2]) + (" ..." if lines[2:] else ""))
    return models


def _count_runs(results: dict[str, Any]) -> None:
    """Note the code version and machine of every run a task's table is built from (report.count_run)."""
    for runs in results["runs"].values():
        for run in runs:
            report.count_run(run)


def plot_curves(results: dict[str, Any], path: Path, title: str) -> None:
    """Validation loss (and accuracy for classification) per epoch; line = mean over seeds, band = min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classification = results["classification"]
    panels = [("loss", "validation " + ("cross-entropy" if classification else "MSE"), 1.0)]
    if classification:
        panels.append(("accuracy", "validation accuracy (%)", 100.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], panels):
        for rule, runs in results["runs"].items():
            runs = [r["history"] for r in runs if r["history"]]
            if not runs:
                continue
            n = min(len(h) for h in runs)
            per_epoch = [[scale * h[i]["val"][metric] for h in runs] for i in range(n)]
            epochs = range(1, n + 1)
            line, = ax.plot(epochs, [statistics.fmean(v) for v in per_epoch], label=f"{rule} ({len(runs)} seeds)")
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.2)
        if results["linear"] and metric == "loss":
            ax.axhline(results["linear"]["loss"], color="gray", ls="--", label="linear (least squares), test")
        ax.set(xlabel="epoch", ylabel=label, title=title, yscale="log" if metric == "loss" else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_forecast(models: dict[str, RecurrentNet], data: SeqData, path: Path, windows: tuple[int, ...] = (0, 1000),
                  channel: int = -1) -> None:
    """Predicted vs true future of one channel (ETT: the last, oil temperature OT) for test windows, normalised."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = tuple(w for w in windows if w < len(data.x_test))
    fig, axes = plt.subplots(1, len(windows), figsize=(6 * len(windows), 3.8), squeeze=False)
    lookback = data.x_test.shape[1]
    for ax, w in zip(axes[0], windows):
        past = data.x_test[w, :, channel]
        future = data.y_test[w].view(data.horizon, data.channels)[:, channel]
        ax.plot(range(lookback), past, color="black", lw=1, label="look-back")
        ax.plot(range(lookback, lookback + data.horizon), future, color="black", lw=2, label="true")
        for rule, model in models.items():
            model.eval()
            pred = model.forecast(model(data.x_test[w:w + 1]))[0, :, channel]
            ax.plot(range(lookback, lookback + data.horizon), pred, lw=1.2, label=rule)
        ax.set(xlabel="step (hours for ETT)", ylabel="normalised value", title=f"{data.name}, test window {w}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metric(run: dict[str, Any], classification: bool) -> float:
    return 100 * run["test"]["accuracy"] if classification else run["test"]["loss"]


def _verdict(key: str, results: dict[str, Any]) -> str:
    """Whether the issue's goal holds for each FTP variant, computed from the means (adding: FTP < 0.05 and <= 2x
    BPTT; ETT: <= 1.1x)."""
    means = {rule: statistics.fmean(_metric(r, results["classification"]) for r in runs if not r["diverged"])
             for rule, runs in results["runs"].items() if any(not r["diverged"] for r in runs)}
    if "bptt" not in means:
        return "BPTT diverged in every run"
    verdicts = []
    for rule in (r for r in results["runs"] if r.split(":")[0] == "ftp"):
        if rule not in means:
            verdicts.append(f"{rule} diverged in every run")
            continue
        ratio = means[rule] / means["bptt"]
        if key.startswith("adding"):
            met = means[rule] < 0.05 and ratio <= 2
            verdicts.append(f"{rule}/BPTT MSE ratio {ratio:.2f}, goal " + ("met" if met else "not met"))
        elif key.startswith("etth1"):
            verdicts.append(f"{rule}/BPTT MSE ratio {ratio:.3f}, goal " + ("met" if ratio <= 1.1 else "not met"))
        else:
            verdicts.append(f"{rule}/BPTT ratio {ratio:.3f}")
    return "; ".join(verdicts)


def study_sequences(budget: Budget, runs: Path, figures: Path) -> tuple[str, list[list[str]]]:
    """Every setup of SETUPS with every rule; per setup a table, learning curves (and forecasts for ETT)."""
    seeds = budget.seeds
    parts, summary = [], []
    for key, base, goal in SETUPS:
        cfg = base if budget.name == "full" else dataclasses.replace(base, epochs=min(base.epochs, budget.epochs))
        results, models, data = _run(cfg, seeds, budget.bench_rounds, runs / f"sequences-{key}")
        net = f"{cfg.cell} {cfg.layers} x {cfg.hidden}"
        title = f"{results['data']}, {net}"
        curves = f"sequences-{key}.{budget.name}.png"
        plot_curves(results, figures / curves, title)
        plots = f"![learning curves](results/{curves})\n"
        if cfg.task == "ett":
            forecast = f"sequences-{key}-forecast.{budget.name}.png"
            plot_forecast(models, data, figures / forecast)
            plots += f"\n![predicted vs true, test set](results/{forecast})\n"
        verdict = _verdict(key, results)
        command = (f"ftprop sequences --task {cfg.task} --rules {','.join(RULES)} --cell {cfg.cell} "
                   f"--hidden {cfg.hidden}" + (f" --layers {cfg.layers}" if cfg.layers != 1 else "")
                   + f" --epochs {cfg.epochs} --seeds {seeds}"
                   + (f" --T {cfg.T}" if cfg.task in ("adding", "order") else "")
                   + (f" --horizon {cfg.horizon}" if cfg.horizon else ""))
        parts.append(f"### {title}\n\nGoal: {goal}. Result: {verdict}.\n\n{net}, "
                     f"Adam lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs, seeds 0..{seeds - 1}; test "
                     f"figures at each run's best validation epoch; cost per training sequence measured in the same "
                     f"process ({budget.bench_rounds} interleaved rounds).\n\n{results_table(results)}\n\n"
                     f"Command: `{command}`\n\n{plots}")
        figures_by_rule = "; ".join(
            f"{rule} {report.mean_std([_metric(r, results['classification']) for r in rs if not r['diverged']])[0]:.4g}"
            if any(not r["diverged"] for r in rs) else f"{rule} diverged" for rule, rs in results["runs"].items())
        unit = "test accuracy %" if results["classification"] else "test MSE"
        summary.append([title, f"{unit}: {figures_by_rule} ({verdict})", goal])
    return "\n".join(parts), summary
