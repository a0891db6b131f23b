"""Cost of one training step per rule, measured side by side in one process.

Wall time is noisy on a shared machine, so rules are timed in interleaved
rounds (bp, ftp, bp, ftp, ...) and each rule's figure is the median over
rounds; ratios to BP come from the same run. FLOPs are counted with
`torch.utils.flop_counter`'s formulas (matmuls and convolutions: 2 FLOPs per
MAC) but without its module hooks (`FlopCount`), and peak memory by tracking
the tensor storages alive during the step.
A rule with `pipeline=True` (FTP) steps each block's parameter group as soon
as its gradients exist (ftprop/pipeline.py), so it is timed with its own
optimizer steps included, like the others.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from . import pipeline
from .data import Dataset
from .models import Net
from .rules import Rule
from .train import TrainConfig, train


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run while active, by the formulas of torch's FLOP counter (`flop_registry`).

    torch's `FlopCounterMode` also attributes FLOPs to modules, through global module hooks, and FTP does not make its
    step rewrites under a global hook (block 2's first op at rank K, the folded loss weight, in-place activations:
    `rules/ftp.py`), so under that counter FTP's step is not the one `benchmark` times. This mode counts ops the
    same way (an op the registry lacks is decomposed if it can be, as there) and installs no hook.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket not in flop_registry:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (on any device).

    Every op's outputs are recorded with a weak reference to their storage;
    storages freed since the last op are dropped before the new ones are
    counted, so `peak` is the high-water mark of memory the step allocated.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _step(model: Net, rule: Rule, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    rule.step(model, x, y)
    if not pipeline.enabled(rule):  # a pipelined rule has stepped every block already
        opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setups(rules: dict[str, Rule], make_model: Callable[[], Net], device: torch.device
            ) -> dict[str, tuple[Net, Rule, torch.optim.Optimizer]]:
    """Per rule, a fresh model (seed 0) and its optimizer."""
    setups = {}
    for name, rule in rules.items():
        torch.manual_seed(0)
        model = make_model().to(device)
        pipelined = pipeline.enabled(rule)
        opt = torch.optim.SGD(pipeline.param_groups(model) if pipelined else model.parameters(), lr=1e-3, momentum=0.9)
        if pipelined:
            pipeline.wire(rule, model, opt)
        setups[name] = (model, rule, opt)
    return setups


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of the population `values` were drawn from: the
    order statistics (j, n + 1 - j) with j the largest rank for which a Binomial(n, 1/2) count falls below j with
    probability at most (1 - level) / 2, so the interval covers the median with probability at least `level` whatever
    the distribution (e.g. the 4th and 12th of 15 values, 96.5%). None when n is too small for that (n < 6 at 95%).

    Why: a ratio's range over repeats widens as repeats are added, while the uncertainty of its median narrows; a
    goal such as FTP / BP <= 1.15 is settled by where the median can lie, not by the extremes of single repeats.
    """
    if not 0 < level < 1:
        raise ValueError(f"median_interval: level must be in (0, 1), got {level}")
    n, tail, j = len(values), 0.0, 0
    while j < n and tail + math.comb(n, j) / 2 ** n <= (1 - level) / 2:
        tail += math.comb(n, j) / 2 ** n
        j += 1
    if j == 0:
        return None
    ordered = sorted(values)
    return ordered[j - 1], ordered[n - j]


def benchmark(rules: dict[str, Rule], make_model: Callable[[], Net], x: torch.Tensor, y: torch.Tensor,
              batch_size: int, rounds: int = 15, steps_per_round: int = 20, warmup: int = 5,
              repeats: int = 1) -> dict[str, dict[str, Any]]:
    """Per rule: median step time over interleaved rounds, ratio to BP, FLOPs and peak memory per step.

    repeats > 1 times `rounds` rounds `repeats` times, each time with fresh models and optimizers. On a CPU the
    ratio between two rules moves from one set of models to the next by more than it moves between rounds (measured
    on the residual CNN, 2 threads: 1.13 to 1.22 over five repeats in one process, each the median of 7 rounds), so a
    single set's median understates the uncertainty. The ratio is then the median over repeats of each repeat's
    ratio, with its range in `ratio_range` (None for BP itself) and a 95% confidence interval for that median in
    `ratio_ci` (`median_interval`; None with fewer than 6 repeats); step times are medians of the repeats' medians.
    rounds=0 measures FLOPs and memory only (timing fields are then None).
    """
    # Checked here, not left to the loop: no steps failed with an IndexError, and negative rounds silently timed
    # nothing under a header that claimed them.
    if repeats < 1:
        raise ValueError(f"benchmark: repeats must be >= 1 (--repeats), got {repeats}")
    if steps_per_round < 1:
        raise ValueError(f"benchmark: steps per round must be >= 1 (--steps), got {steps_per_round}")
    if rounds < 0 or warmup < 0:
        raise ValueError(f"benchmark: rounds (--rounds; 0: FLOPs and memory only) and warmup must be >= 0, got "
                         f"{rounds} and {warmup}")
    device = x.device
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(y), (batch_size,), generator=gen).to(device) for _ in range(steps_per_round)]
    results: dict[str, dict[str, Any]] = {}
    medians: dict[str, list[float]] = {name: [] for name in rules}
    pooled: dict[str, list[float]] = {name: [] for name in rules}
    for repeat in range(repeats if rounds else 1):  # nothing to time: one set of models gives FLOPs and memory
        setups = _setups(rules, make_model, device)
        for model, rule, opt in setups.values():
            for idx in batches[:warmup]:
                _step(model, rule, opt, x[idx], y[idx])
        if repeat == 0:
            for name, (model, rule, opt) in setups.items():
                with FlopCount() as counter:
                    _step(model, rule, opt, x[batches[0]], y[batches[0]])
                with PeakMemory() as mem:
                    _step(model, rule, opt, x[batches[0]], y[batches[0]])
                results[name] = {"flops_per_step": counter.flops, "peak_memory_bytes": mem.peak}
        times: dict[str, list[float]] = {name: [] for name in rules}
        for _ in range(rounds):
            for name, (model, rule, opt) in setups.items():
                _sync(device)
                t0 = time.perf_counter()
                for idx in batches:
                    _step(model, rule, opt, x[idx], y[idx])
                _sync(device)
                times[name].append((time.perf_counter() - t0) / len(batches))
        for name in rules:
            if times[name]:
                medians[name].append(statistics.median(times[name]))
                pooled[name] += times[name]

    base = medians.get("bp")
    for name, r in results.items():
        ratios = [m / b for m, b in zip(medians[name], base)] if base else []
        r["step_time_median_s"] = statistics.median(medians[name]) if medians[name] else None
        quartiles = statistics.quantiles(pooled[name], n=4) if len(pooled[name]) > 1 else None
        r["step_time_iqr_s"] = quartiles[2] - quartiles[0] if quartiles else None
        r["ratio_to_bp"] = statistics.median(ratios) if ratios else None
        r["ratio_range"] = (min(ratios), max(ratios)) if len(ratios) > 1 and name != "bp" else None
        r["ratio_ci"] = median_interval(ratios) if name != "bp" else None
        r["flops_per_sample"] = r["flops_per_step"] / batch_size
        r["batch_size"] = batch_size
        r["rounds"] = rounds
        r["steps_per_round"] = steps_per_round
        r["repeats"] = repeats
    return results


def alignment_overhead(cfg: TrainConfig, data: Dataset, every: int, rounds: int = 7,
                       records: int = 4) -> dict[str, Any]:
    """Training time with alignment logged every `every` steps against none, measured in the real training loop.

    Both settings train one epoch over the same `records * every` batches (so the logged one computes exactly
    `records` BP gradients), alternating off/on `rounds` times from the same seed; each figure is the median epoch
    time (evaluation excluded), and the overhead is their ratio minus one, from the same run.
    """
    if every < 1 or rounds < 1 or records < 1:  # rounds=0 failed in statistics.median with 'no median for empty data'
        raise ValueError(f"alignment overhead: the logging interval (--log-alignment), rounds (--rounds) and records "
                         f"must be >= 1, got {every}, {rounds} and {records}")
    n = records * every * cfg.batch_size
    if n > len(data.y_train):
        raise ValueError(f"alignment overhead: {records} records every {every} steps at batch {cfg.batch_size} need "
                         f"{n} training samples; the dataset has {len(data.y_train)}")
    few = slice(0, cfg.batch_size)  # evaluation is not timed; keep it short
    subset = dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n],
                                 x_val=data.x_val[few], y_val=data.y_val[few], x_test=data.x_test[few],
                                 y_test=data.y_test[few])
    times: dict[int, list[float]] = {0: [], every: []}
    for _ in range(rounds):
        for interval in times:
            run = dataclasses.replace(cfg, epochs=1, log_alignment=interval, out=None, progress=False)
            times[interval].append(train(run, subset)["seconds_per_epoch"])
    off, on = statistics.median(times[0]), statistics.median(times[every])
    return {"every": every, "steps_per_epoch": records * every, "rounds": rounds, "epoch_s_off": off,
            "epoch_s_on": on, "overhead": on / off - 1}
