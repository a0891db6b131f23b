"""The training loop: one config, read top to bottom.

A run directory holds `config.json` (the resolved config and the code version that ran it), `metrics.jsonl`
(one line per epoch), `checkpoint.pt` (written atomically after every good
epoch) and `metrics.json` (the summary). `resume=True` continues from the
checkpoint and reproduces the uninterrupted run bit for bit on CPU.

Launched by torchrun as several processes, the same loop trains data-parallel
(ftprop/distributed.py): `batch_size` is the global batch, each rank steps on
its shard, gradients are averaged before the optimizer step, and rank 0 alone
writes the run directory. With one process those calls do nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed, pipeline, report
from .data import Dataset, DatasetError, batches, load_dataset, shift_images
from .diagnostics import alignment, rng_state
from .hardware import attach as attach_hardware, check_hardware
from .models import MEMORY_FORMATS, Net, build_model, parse_hidden
from .rules import RULES, Rule, checked_options, make_rule
from .rules.base import typed_value

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "step", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a run. Field names are the TOML keys and (with - for _) the CLI flags."""

    dataset: str = "mnist"
    model: str = "mlp"
    hidden: str = "1024,128"
    activation: str = "tanh"
    norm: str = "none"
    init: str = "torch"
    depth: int | None = None          # conv layers of --model resnet (None: its default, 6)
    spec: str | None = None           # --model spec: the model as a spec string (ftprop.models.SPEC_GRAMMAR)
    rule: str = "ftp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9             # SGD's momentum; with optimizer "adam" its beta1 (the same running mean of grads)
    weight_decay: float = 0.0
    schedule: str = "none"            # "step": lr *= lr_decay every lr_step epochs; "cosine": to 0 over the run
    lr_step: int = 10
    lr_decay: float = 0.1
    val_size: int = 5000
    seed: int = 0
    quant: str = ""                   # low-precision training, e.g. "w8a8e8u8" (ftprop/hardware.py); "" = float32
    rounding: str = "nearest"         # rounding of `quant`: nearest or stochastic
    analog: str = ""                  # analog crossbar preset, e.g. "reram", "reram:read_noise=0.05" (ftprop/analog.py)
    device: str = "cpu"
    data_dir: str | None = None
    out: str | None = None
    progress: bool = True
    log_alignment: int = 0            # every N steps, log each layer's angle to the BP gradient (0: off)
    label_noise: float = 0.0          # fraction of TRAINING labels replaced by another class (noisy_labels)
    shift: int = 0                    # training images translated by up to this many pixels each way (0: off)
    memory_format: str = "contiguous"  # "channels_last": conv maps stored N x H x W x C (faster pooling on CPU)

    def __post_init__(self) -> None:
        if isinstance(self.hidden, int) and not isinstance(self.hidden, bool):  # TOML `hidden = 32`: one layer
            self.hidden = [self.hidden]
        if isinstance(self.hidden, (list, tuple)):
            self.hidden = ",".join(str(h) for h in self.hidden)
        # Every key against its field's type (a TOML `epochs = "3"` or `batch_size = 64.0` fails here, naming the key,
        # not as a traceback mid-run); the rule options against the rule's own fields, the same way (make_rule).
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, typed_value(getattr(self, f.name), hints[f.name], f.name))
        if self.rule in RULES:  # an unknown rule is reported by make_rule, which lists the rules
            self.rule_options = checked_options(self.rule, self.rule_options)
        parse_hidden(self.hidden)
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "lr_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_decay"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:  # 1 or more: the running sum of gradients grows without bound
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if self.log_alignment < 0:
            raise ValueError(f"log_alignment must be >= 0 steps (0: off), got {self.log_alignment}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {self.shift}")
        check_hardware(self.quant, self.rounding, self.analog)
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory_format {self.memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}")

    def build_model(self, input_shape: tuple[int, ...], num_classes: int) -> Net:
        """This config's model for data of `input_shape` and `num_classes`, on the CPU (initialised from the global
        RNG: seed it first)."""
        return build_model(self.model, input_shape, num_classes, self.hidden, self.activation, self.norm, self.init,
                           depth=self.depth, spec=self.spec, memory_format=self.memory_format)

    def model_label(self) -> str:
        """The net in words, for table headers and plot titles."""
        arch = {"mlp": f"mlp {self.hidden.replace(',', '-')}", "resnet": f"resnet depth {self.depth or 6}",
                "spec": f"spec {self.spec}"}.get(self.model, self.model)
        extras = "".join(f", {k} {v}" for k, v in (("norm", self.norm), ("quant", self.quant), ("analog", self.analog),
                                                   ("memory", self.memory_format)) if v and v not in ("none", "contiguous"))
        return f"{arch} {self.activation}{extras}"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping (a TOML file's contents); a `[rule]` table gives rule options."""
        values = dict(values)
        if "rule" in values and isinstance(values["rule"], dict):
            rule_table = dict(values.pop("rule"))
            values["rule"] = rule_table.pop("name", cls.rule)
            values["rule_options"] = {**values.get("rule_options", {}), **rule_table}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ValueError as err:  # a bad value: say which file it came from
            raise ValueError(f"{source}: {err}") from None


def read_toml(path: str | Path, flag: str) -> dict[str, Any]:
    """The contents of the TOML file `path` given with `flag`; a missing file, a directory, bad TOML or bad UTF-8
    raises ValueError naming the flag and the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag}: {path} is a directory, not a TOML file" if path.is_dir() else
                         f"{flag}: no such file {path}")
    try:
        with open(path, "rb") as f:
            return dict(tomllib.load(f))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag}: {path} is not valid TOML: {err}") from None
    except OSError as err:
        raise ValueError(f"{flag}: cannot read {path}: {err.strerror}") from None


def dir_problem(path: Path, flag: str) -> str | None:
    """Why `path` (given with `flag`) cannot become a directory, a file being there or above it, or None. It creates
    nothing, so that `train` can ask at start-up, before loading data, and tell every rank rank 0's answer."""
    for here in (path, *path.parents):
        try:
            if here.is_dir():
                return None
            if not here.exists():
                continue
        except OSError:  # not allowed to look: creating the directory fails then, and make_dir says why
            return None
        return (f"{flag} {path} is a file, not a directory; choose another {flag}" if here == path else
                f"{flag} {path} lies under a file, not a directory; choose another {flag}")
    return None


def make_dir(path: Path, flag: str) -> None:
    """Create the output directory `path` (given with `flag`), or say why it cannot be one."""
    problem = dir_problem(path, flag)
    if problem:
        raise ValueError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create the directory: {err.strerror}") from None


LABEL_NOISE_SEED = 0x4E015E  # offset so the noise stream differs from the batch-order stream of the same seed
SHIFT_SEED = 0x5A1F7  # the same for the translations of `shift`: a run without them draws exactly what it did before


def noisy_labels(y: torch.Tensor, p: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: exactly round(p * N) labels, chosen uniformly, each replaced by a uniformly random
    OTHER class. Drawn from its own generator seeded by LABEL_NOISE_SEED + seed, so a run's noisy labels depend only
    on its seed (the same for every rule) and draw nothing from the global RNG or the batch order."""
    if p == 0:
        return y
    gen = torch.Generator().manual_seed(LABEL_NOISE_SEED + seed)
    idx = torch.randperm(len(y), generator=gen)[:round(p * len(y))]
    shift = torch.randint(1, num_classes, (len(idx),), generator=gen)
    noisy = y.clone()
    noisy[idx.to(y.device)] = (y[idx.to(y.device)] + shift.to(y.device)) % num_classes
    return noisy


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the weights stop being finite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's own message is a list of every backend it was built to know
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """`cfg.momentum` is SGD's momentum or Adam's beta1, so the flag is never silently dropped (its default, 0.9, is
    torch's default beta1: Adam runs as before); beta2 stays torch's 0.999."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, epochs: int, lr_step: int = 10, lr_decay: float = 0.1) -> Callable[[int], float]:
    """The learning rate's factor in epoch e (0-based) under `schedule` (SCHEDULES); shared with the sequence loop."""
    if schedule == "step":
        return lambda e: lr_decay ** (e // lr_step)
    if schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))
    return lambda e: 1.0


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, cfg.epochs, cfg.lr_step, cfg.lr_decay))


@torch.no_grad()
def evaluate(model: Net, rule: Rule, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """(mean cross-entropy of the rule's class scores, accuracy) in eval mode."""
    if len(y) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        logits = rule.predict(model, x[i:i + batch_size])
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    return loss.item() / len(y), correct.item() / len(y)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _alignment_until(path: Path, epoch: int) -> list[str]:
    """The lines of a resumed run's alignment.jsonl up to `epoch`, the checkpoint's. A last line cut short (the run
    stopped while appending it) belongs to a step after the checkpoint and goes with the others; any other line that is
    not a record is an error naming the file and line, not a JSON decoder's message."""
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            record_epoch = json.loads(line)["epoch"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if i == len(lines):
                break
            raise ValueError(f"--resume: {path} line {i} is not an alignment record; repair or delete the file (the "
                             f"resumed run then logs alignment from epoch {epoch + 1} on)") from None
        if record_epoch <= epoch:
            kept.append(line)
    return kept


def _all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _summary(history: list[dict[str, Any]], seconds: float, diverged: str | None) -> dict[str, Any]:
    best = max(history, key=lambda m: m["val_accuracy"] if m["val_accuracy"] == m["val_accuracy"] else -1.0,
               default=None)
    last = history[-1] if history else None
    return {
        "test_accuracy": last["test_accuracy"] if last else None,
        "best_val_accuracy": best["val_accuracy"] if best and best["val_accuracy"] == best["val_accuracy"] else None,
        "test_accuracy_at_best_val": best["test_accuracy"] if best and best["val_accuracy"] == best["val_accuracy"]
        else None,  # without a validation split there is no best epoch to report
        "seconds": seconds,
        "seconds_per_epoch": statistics.median(m["train_seconds"] for m in history) if history else None,
        "epochs": len(history),
        "diverged": diverged,
    }


def train(cfg: TrainConfig, data: Dataset | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one run and return its summary (the contents of metrics.json)."""
    ctx, device = distributed.init(resolve_device(cfg.device))  # one process unless launched by torchrun
    # the whole run must be the same on every rank; where the dataset is read and the progress bar may differ. Rank 0
    # alone writes --out, so its answer alone says whether --out can be the run directory: given in the same gather
    out_problem = dir_problem(Path(cfg.out), "--out") if cfg.out and ctx.main else None
    # Each rank reads its own copy of the data (on its own machine, --data-dir may differ): one that cannot tells the
    # others in the same gather, where they would otherwise wait for it in the model's broadcast and fail in gloo.
    data_problem = None
    if data is None and not out_problem:
        try:
            data = load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, device=device)  # one split, all seeds
        except DatasetError as err:
            if not ctx.active:
                raise
            data_problem = f"rank {ctx.rank} cannot read its data: {err}"
    distributed.check_same({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir", "progress")}
                           | {"resume": resume}, ctx, failure=out_problem or data_problem)
    distributed.check_batch_size(cfg.batch_size, ctx)
    run_dir = Path(cfg.out) if cfg.out else None
    out = run_dir if ctx.main else None  # the directory this process writes: only rank 0 writes
    torch.manual_seed(cfg.seed)
    model = cfg.build_model(data.input_shape, data.num_classes).to(device)
    rule: Rule = make_rule(cfg.rule, **cfg.rule_options)
    pipelined = pipeline.enabled(rule)  # the rule steps each block's parameter group itself, inside rule.step
    opt = make_optimizer(cfg, pipeline.param_groups(model) if pipelined else model.parameters())
    sched = make_scheduler(cfg, opt)
    hardware = attach_hardware(model, opt, cfg.quant, cfg.rounding, cfg.analog, seed=cfg.seed)  # nothing for float
    if pipelined:
        if hardware or cfg.log_alignment:
            raise ValueError("pipeline=True does not combine with --quant, --analog or --log-alignment (their hooks "
                             "and the alignment check assume one optimizer step after the rule's step)")
        pipeline.wire(rule, model, opt, lambda params: distributed.average_grads(params, ctx))
    distributed.shard_rule(rule, ctx)
    order = torch.Generator().manual_seed(cfg.seed)  # batch order, independent of model init and dropout
    shifts = torch.Generator().manual_seed(SHIFT_SEED + cfg.seed)  # the translations of `shift`, drawn only if on
    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0

    ckpt_path = run_dir / "checkpoint.pt" if run_dir else None
    if resume:
        if ckpt_path is None:
            raise ValueError("--resume needs --out: the run directory whose checkpoint to continue")
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = ckpt["config"]
        mine = dataclasses.asdict(cfg)
        changed = {k for k in saved if k not in ("epochs", "progress", "out", "device", "data_dir", "log_alignment")
                   and saved[k] != mine.get(k)}
        if changed:
            raise ValueError(f"--resume: config differs from the checkpoint in {', '.join(sorted(changed))}")
        if ckpt["epoch"] > cfg.epochs:
            raise ValueError(f"--resume: {run_dir} has already trained {ckpt['epoch']} epochs, more than the "
                             f"{cfg.epochs} asked for; give --epochs {ckpt['epoch']} or more, or another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if saved["epochs"] != cfg.epochs:
            # The optimizer restored the learning rate of the old run's schedule (0 at the end of a cosine run);
            # a schedule that depends on the total (cosine) continues from this epoch on the new total's curve.
            for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
        rule.load_state_dict(ckpt["rule"])
        hardware.load_state_dict(ckpt.get("hardware", {}))
        order.set_state(ckpt["order_rng"])
        shifts.set_state(ckpt.get("shift_rng", shifts.get_state()))  # absent in checkpoints from before `shift`
        torch.set_rng_state(ckpt["torch_rng"])
        history, start_epoch, elapsed = ckpt["history"], ckpt["epoch"], ckpt["elapsed"]
    distributed.broadcast_model(model, ctx)
    if out:
        make_dir(out, "--out")
        # config.json says which run this directory holds, and `compare --resume` (so `ftprop reproduce`) reuses
        # metrics.json and checkpoint.pt by it: another run's results go before this config is recorded, so that an
        # interruption from here on never leaves this config beside an older run's results.
        (out / "metrics.json").unlink(missing_ok=True)  # rewritten when this run ends
        if not resume:
            ckpt_path.unlink(missing_ok=True)
        _write_json(dataclasses.asdict(cfg) | {"resolved_rule_options": rule.options(), "code": report.code_version(),
                                               "machine": report.machine()},
                    out / "config.json")
        # Start the per-epoch logs afresh, or (resuming) cut them back to the checkpoint: a crash between a log
        # write and the checkpoint must not leave an epoch logged twice.
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        angles_log = out / "alignment.jsonl"
        if cfg.log_alignment or angles_log.exists():
            kept = _alignment_until(angles_log, start_epoch) if resume and angles_log.exists() else []
            angles_log.write_text("".join(line + "\n" for line in kept))

    x, y = data.x_train, noisy_labels(data.y_train, cfg.label_noise, data.num_classes, cfg.seed)  # val/test clean
    diverged = None
    angles: list[dict[str, Any]] = []  # alignment records of the current epoch
    rule_synced = False  # rules create their state at their first step; then rank 0's is copied to every rank
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)  # on this rank's shards
        seen = 0  # samples of the global batches so far
        steps = math.ceil(len(y) / cfg.batch_size)
        bar = tqdm(batches(len(y), cfg.batch_size, order, device), total=steps, leave=False,
                   disable=not (cfg.progress and ctx.main), desc=f"{cfg.rule} epoch {epoch + 1}/{cfg.epochs}")
        for step, batch_idx in enumerate(bar):
            idx = distributed.shard(batch_idx, ctx)  # the whole batch in one process
            if len(idx) == 0:  # a final batch smaller than the number of processes
                continue
            xb, yb = x[idx], y[idx]
            if cfg.shift:  # drawn for the global batch, so every rank takes its shard of the same translations
                offsets = torch.randint(0, 2 * cfg.shift + 1, (len(batch_idx), 2), generator=shifts)
                xb = shift_images(xb, distributed.shard(offsets, ctx).to(device), cfg.shift)
            log_now = cfg.log_alignment and (epoch * steps + step) % cfg.log_alignment == 0
            rng = rng_state(device) if log_now else None
            result = rule.step(model, xb, yb)
            loss = distributed.average(model, rule, result.loss, ctx, grads=not pipelined)  # the global batch's
            if not rule_synced:  # after `average`, which has already made the rule's learned state agree
                distributed.broadcast_rule(rule, ctx)
                rule_synced = True
            if not torch.isfinite(loss):
                diverged = f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}"
                break
            if log_now and ctx.main:
                angles.append({"epoch": epoch + 1, "step": step + 1, "layers": alignment(model, xb, yb, rng)})
            if not pipelined:
                opt.step()
            loss_sum += loss * (len(yb) * ctx.world)
            correct += (result.logits.argmax(1) == yb).sum()
            seen += len(yb) * ctx.world
            if step % 50 == 0 and cfg.progress and ctx.main:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() * ctx.world / seen:.4f}")
        bar.close()
        if out and angles:
            with open(angles_log, "a") as f:
                f.writelines(json.dumps(a) + "\n" for a in angles)
        angles.clear()
        if diverged is None and not _all_finite(model):
            diverged = f"weights stopped being finite in epoch {epoch + 1}"
        if diverged:
            break
        correct = distributed.all_sum(correct, ctx)
        train_seconds = time.perf_counter() - t0
        lr = opt.param_groups[0]["lr"]  # the rate this epoch trained with, before the schedule moves to the next's
        sched.step()
        val_loss, val_acc = evaluate(model, rule, data.x_val, data.y_val)
        test_loss, test_acc = evaluate(model, rule, data.x_test, data.y_test)
        elapsed += time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "lr": lr,
                   "train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
                   "val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc,
                   "train_seconds": train_seconds}
        history.append(metrics)
        if out:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            _atomic_save({"config": dataclasses.asdict(cfg), "epoch": epoch + 1, "elapsed": elapsed,
                          "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "rule": rule.state_dict(), "order_rng": order.get_state(), "shift_rng": shifts.get_state(),
                          "torch_rng": torch.get_rng_state(),
                          "hardware": hardware.state_dict(), "history": history}, ckpt_path)
        if cfg.progress and ctx.main:
            tqdm.write(f"{cfg.rule} epoch {epoch + 1}: train loss {metrics['train_loss']:.4f} "
                       f"val acc {val_acc:.4f} test acc {test_acc:.4f} ({train_seconds:.1f}s)")

    summary = _summary(history, elapsed, diverged)
    if out:
        _write_json(summary, out / "metrics.json")
    distributed.barrier(ctx)  # every rank leaves once rank 0's files are written (a resume may read them next)
    if diverged:
        kept = f"; last good checkpoint (epoch {len(history)}) kept in {ckpt_path}" if out and history else ""
        raise TrainingDiverged(f"training diverged: {diverged}{kept}")
    return summary
