"""Training recurrent nets on sequence tasks: one config, a seeded loop, a linear baseline and the cost per sequence.

Runs are seeded (model initialisation and batch order) and bit-reproducible on CPU. Every epoch is evaluated on the
validation and test splits; the reported test figures are those of the epoch with the lowest validation loss (early
stopping, as in the published ETT protocol), and the returned model holds that epoch's weights.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import report
from .bench import benchmark
from .train import SCHEDULES, lr_factor
from .data import batches
from .recurrent import RecurrentNet, build_recurrent
from .rules import Rule, make_sequence_rule, rule_variant
from .rules._recurrent import sequence_loss
from .sequences import SeqData, check_window, load_sequence_task


@dataclass
class SeqConfig:
    """Everything that defines a sequence run (CLI flags of `ftprop sequences` with - for _)."""

    task: str = "adding"              # adding, order, ett (etth1), sunspots, co2
    T: int = 50                       # synthetic tasks: sequence length
    classes: int = 4                  # temporal order: 4 or 8
    n_train: int = 10000              # synthetic tasks: training sequences (validation and test: n_test each)
    n_test: int = 2000
    csv: str | None = None            # ett: path of an ETT-format CSV (else $FTPROP_ETT, else ../shared/data/ett)
    lookback: int | None = None       # forecasting: look-back window (None: the task's default, ETT 96)
    horizon: int | None = None        # forecasting: steps ahead (ETT 96, 192, 336 or 720)
    subtract_last: bool = True       # forecasting: subtract each window's last value (NLinear), add it back
    cell: str = "gru"
    hidden: int = 64
    layers: int = 1
    rule: str = "ftp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3                  # Adam: its per-parameter step sizes make the rules' different gradient scales
    seed: int = 0                     # (summed over time steps, projected errors) comparable at one learning rate
    schedule: str = "none"            # "cosine": lr to 0 over the run; "step": lr *= lr_decay every lr_step epochs;
    lr_step: int = 10                 # both stepped per epoch, as in `ftprop train`
    lr_decay: float = 0.1

    def __post_init__(self) -> None:
        for name in ("T", "n_train", "n_test", "hidden", "layers", "epochs", "batch_size", "lr_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lookback", "horizon"):
            check_window(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def load(self) -> SeqData:
        return load_sequence_task(self.task, self.T, self.classes, self.n_train, self.n_test, self.csv,
                                  self.lookback, self.horizon)

    def build(self, data: SeqData) -> RecurrentNet:
        return build_recurrent(self.cell, data.input_size, self.hidden, data.num_outputs, self.layers, data.horizon,
                               data.channels, self.subtract_last and data.horizon > 0)


@torch.no_grad()
def evaluate(model: RecurrentNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """loss (CE or MSE) and accuracy (classification) or MAE (regression), in eval mode."""
    z = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    out = {"loss": sequence_loss(z, y).item()}
    if y.dtype == torch.int64:
        out["accuracy"] = (z.argmax(1) == y).float().mean().item()
    else:
        out["mae"] = (z - y).abs().mean().item()
    return out


def train_sequences(cfg: SeqConfig, data: SeqData | None = None) -> tuple[dict[str, Any], RecurrentNet]:
    """Train one run; returns (summary, the model at its best validation epoch). Summary keys: test (metrics at the
    best validation epoch), best_epoch, history (per epoch: lr, train_loss, val, test, seconds), diverged (or None)."""
    data = data or cfg.load()
    torch.manual_seed(cfg.seed)
    model = cfg.build(data)
    rule: Rule = make_sequence_rule(cfg.rule, **cfg.rule_options)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, cfg.epochs, cfg.lr_step, cfg.lr_decay))
    order = torch.Generator().manual_seed(cfg.seed)
    x, y = data.x_train, data.y_train
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    diverged = None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, lr = 0.0, opt.param_groups[0]["lr"]
        for idx in batches(len(y), cfg.batch_size, order, torch.device("cpu")):
            loss = rule.step(model, x[idx], y[idx]).loss
            if not torch.isfinite(loss):
                diverged = f"loss became {loss.item()} in epoch {epoch}"
                break
            opt.step()
            loss_sum += loss.item() * len(idx)
        sched.step()
        if diverged or not all(torch.isfinite(p).all() for p in model.parameters()):
            diverged = diverged or f"weights stopped being finite in epoch {epoch}"
            break
        seconds = time.perf_counter() - t0
        model.eval()
        record = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / len(y), "seconds": seconds,
                  "val": evaluate(model, data.x_val, data.y_val), "test": evaluate(model, data.x_test, data.y_test)}
        history.append(record)
        if best is None or record["val"]["loss"] < best[0]:
            best = (record["val"]["loss"], epoch, copy.deepcopy(model.state_dict()))
    if best is not None:
        model.load_state_dict(best[2])
    summary = {"config": dataclasses.asdict(cfg), "rule_options": rule.options(), "data": data.name,
               "history": history, "diverged": diverged, "best_epoch": best[1] if best else None,
               "test": history[best[1] - 1]["test"] if best else None,
               "seconds_per_epoch": sorted(h["seconds"] for h in history)[len(history) // 2] if history else None,
               "code": report.code_version(), "machine": report.machine()}
    return summary, model


def linear_baseline(data: SeqData) -> dict[str, float]:
    """Closed-form least squares from the look-back window to the horizon, one map shared by all channels
    (channel-independent, as the published linear baselines DLinear/NLinear): y_c = A x_c + b, fitted on the
    training windows in float64. Test MSE and MAE on the normalised values."""
    if data.classification or not data.horizon:
        raise ValueError("the linear baseline is for forecasting tasks")

    def per_channel(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, lookback, c = xs.shape
        inputs = xs.transpose(1, 2).reshape(n * c, lookback).double()
        targets = ys.view(n, data.horizon, c).transpose(1, 2).reshape(n * c, data.horizon).double()
        return torch.cat([inputs, torch.ones(n * c, 1, dtype=torch.float64)], 1), targets

    a, b = per_channel(data.x_train, data.y_train)
    coef = torch.linalg.lstsq(a, b).solution
    a_test, b_test = per_channel(data.x_test, data.y_test)
    err = a_test @ coef - b_test
    return {"loss": err.square().mean().item(), "mae": err.abs().mean().item()}


def sequence_cost(cfg: SeqConfig, data: SeqData, rules: list[str], rounds: int = 7,
                  steps: int = 5) -> dict[str, dict[str, Any]]:
    """Per rule: MACs per training sequence (torch.utils.flop_counter, 2 FLOPs per MAC) and the median step time
    per sequence over interleaved rounds (rules alternate, so they share the machine's state), measured together.
    The timing optimizer is bench.benchmark's SGD; the rule's work dominates a recurrent step either way."""
    made = {}
    for r in rules:
        name, options = _variant(cfg, r)
        made[r] = make_sequence_rule(name, **options)
    res = benchmark(made, lambda: cfg.build(data), data.x_train, data.y_train, cfg.batch_size, rounds=rounds,
                    steps_per_round=steps, warmup=1)
    base = res.get("bptt", {}).get("step_time_median_s")
    # None where nothing was timed (rounds 0) or BPTT is not among the rules: NaN printed as 'nan' in the table and
    # is not JSON
    return {r: {"macs_per_sequence": v["flops_per_sample"] / 2,
                "seconds_per_sequence": v["step_time_median_s"] / cfg.batch_size if rounds else None,
                "time_to_bptt": v["step_time_median_s"] / base if rounds and base else None}
            for r, v in res.items()}


def _variant(cfg: SeqConfig, entry: str) -> tuple[str, dict[str, Any]]:
    """(rule, options) of a `rules` entry (`NAME` or `NAME:KEY=VALUE:...`): cfg.rule_options apply to entries of
    cfg.rule, and the entry's own options override them."""
    name, own = rule_variant(entry)
    return name, (cfg.rule_options if name == cfg.rule else {}) | own


def run_sequences(cfg: SeqConfig, rules: list[str], seeds: int, bench_rounds: int = 7, data: SeqData | None = None,
                  done: dict[str, list[dict[str, Any]]] | None = None
                  ) -> tuple[dict[str, Any], dict[str, RecurrentNet]]:
    """Every rule on seeds 0..seeds-1 with the same data and net, the cost per sequence measured in the same process,
    and (forecasting) the linear baseline. A rule is an entry of `rules`: a name, or `NAME:KEY=VALUE:...` for a rule
    with options of its own. `done` holds finished runs (rule entry -> summaries, from the same cfg and seeds) that
    are kept instead of retrained; the cost is measured for every rule together either way. Returns ({"data",
    "classification", "runs": {rule: [summary...]}, "cost", "linear"}, {rule: its seed-0 model at the best validation
    epoch, for the rules trained here}) (the models are for plots of predictions)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    variants = {r: _variant(cfg, r) for r in rules}
    for name, options in variants.values():  # fail on a bad rule or option before any training
        make_sequence_rule(name, **options)
    data = data or cfg.load()
    runs: dict[str, list[dict[str, Any]]] = {}
    models: dict[str, RecurrentNet] = {}
    for r, (name, options) in variants.items():
        if done and r in done:
            runs[r] = done[r]
            continue
        for s in range(seeds):
            summary, model = train_sequences(dataclasses.replace(cfg, rule=name, seed=s, rule_options=options), data)
            runs.setdefault(r, []).append(summary)
            models.setdefault(r, model)
    results = {"data": data.name, "classification": data.classification, "runs": runs,
               "cost": sequence_cost(cfg, data, rules, rounds=bench_rounds),
               "linear": linear_baseline(data) if data.horizon else None}
    return results, models


def results_table(results: dict[str, Any]) -> str:
    """Test metric (mean ± std over seeds, at each run's best validation epoch), cost per training sequence and
    time relative to BPTT; forecasting tasks get the linear baseline as a last row."""
    def stat(values: list[float], digits: int = 4) -> str:
        return report.spread(values, digits)

    classification = results["classification"]
    header = ["rule", "test accuracy %" if classification else "test MSE", *([] if classification else ["test MAE"]),
              "MMAC / sequence", "ms / sequence", "time / BPTT", "runs ok"]
    rows = []
    for rule, runs in results["runs"].items():
        ok = [r for r in runs if not r["diverged"] and r["test"]]
        cost = results["cost"][rule]
        metrics = ([stat([100 * r["test"]["accuracy"] for r in ok], 2)] if classification
                   else [stat([r["test"]["loss"] for r in ok]), stat([r["test"]["mae"] for r in ok])]) if ok \
            else ["diverged"] * (1 if classification else 2)
        per_sequence, to_bptt = cost["seconds_per_sequence"], cost["time_to_bptt"]
        rows.append([rule, *metrics, f"{cost['macs_per_sequence'] / 1e6:.3f}",
                     "-" if per_sequence is None else f"{1e3 * per_sequence:.3f}",
                     "-" if to_bptt is None else f"{to_bptt:.2f}", f"{len(ok)}/{len(runs)}"])
    if results["linear"]:
        rows.append(["linear (least squares)", f"{results['linear']['loss']:.4f}", f"{results['linear']['mae']:.4f}",
                     "-", "-", "-", "-"])
    return report.markdown_table(header, rows)
