"""The training loop: learning on real data, bit-for-bit reproducibility, resume, divergence, run files."""
from __future__ import annotations

import importlib
import dataclasses
import json
import math

import pytest
import torch

import ftprop
from ftprop import report
from ftprop.rules import BP, StepOutput
from ftprop.cli import _config, parser
from ftprop.data import Dataset, shift_images
from ftprop.train import TrainConfig, TrainingDiverged, train

train_mod = importlib.import_module("ftprop.train")  # `ftprop.train` the attribute is the function


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(hidden="128,64", epochs=2, batch_size=64, progress=False, out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_ftp_learns_real_mnist(small_mnist, tmp_path, activation):
    """4000 training images, 8 epochs: FTP gets close to BP (measured: tanh 90.1 vs 90.6%, ReLU 91.7 vs 91.7%)."""
    run = lambda rule: train(cfg(tmp_path / rule, rule=rule, activation=activation, hidden="256,128", epochs=8,  # noqa
                                 lr=0.03), small_mnist)["test_accuracy"]
    ftp, bp = run("ftp"), run("bp")
    assert ftp > 0.88, ftp  # chance is 0.10
    assert ftp > bp - 0.02, (ftp, bp)


def test_run_directory_contents(small_mnist, tmp_path):
    c = cfg(tmp_path, rule="ftp", schedule="cosine")
    summary = train(c, small_mnist)
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == summary
    assert 0 <= summary["test_accuracy"] <= 1 and 0 <= summary["best_val_accuracy"] <= 1
    assert summary["epochs"] == 2 and summary["seconds"] > 0 and summary["diverged"] is None
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["lr"] for m in lines] == pytest.approx([0.01, 0.005])  # the rates the two cosine epochs trained at
    config = json.loads((run / "config.json").read_text())
    assert config["rule"] == "ftp" and config["resolved_rule_options"]["gamma"] == 0.1
    assert config["code"] == report.code_version()  # runs record the code that made them
    assert config["machine"] == report.machine()  # and the machine
    assert (run / "checkpoint.pt").exists() and not list(run.glob("*.tmp"))


def _params(out_dir) -> list[torch.Tensor]:
    return list(torch.load(out_dir / "checkpoint.pt", weights_only=False)["model"].values())


def test_seeded_runs_are_bit_identical(small_mnist, tmp_path):
    a = train(cfg(tmp_path / "a", rule="ftp", seed=3), small_mnist)
    b = train(cfg(tmp_path / "b", rule="ftp", seed=3), small_mnist)
    c = train(cfg(tmp_path / "c", rule="ftp", seed=4), small_mnist)
    assert a["test_accuracy"] == b["test_accuracy"]
    pa, pb, pc = (_params(tmp_path / d / "run") for d in "abc")
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))


@pytest.mark.parametrize("crash,shift", [("after checkpoint 1", 0), ("before checkpoint 2", 0),
                                         ("after checkpoint 1", 2)])
def test_resume_continues_bit_identically(small_mnist, tmp_path, monkeypatch, crash, shift):
    full = train(cfg(tmp_path / "full", rule="ftp", epochs=3, schedule="cosine", shift=shift), small_mnist)

    saves = 0
    real_save = train_mod._atomic_save

    def crash_after_first_epoch(obj, path):
        nonlocal saves
        saves += 1
        if crash == "before checkpoint 2" and saves == 2:
            raise KeyboardInterrupt  # dies after epoch 2 was logged but before it was checkpointed
        real_save(obj, path)
        if crash == "after checkpoint 1" and saves == 1:
            raise KeyboardInterrupt  # dies right after epoch 1 was checkpointed

    c = cfg(tmp_path / "cut", rule="ftp", epochs=3, schedule="cosine", shift=shift)
    monkeypatch.setattr(train_mod, "_atomic_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(c, small_mnist)
    monkeypatch.setattr(train_mod, "_atomic_save", real_save)
    resumed = train(c, small_mnist, resume=True)

    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert all(torch.equal(x, y) for x, y in zip(_params(tmp_path / "full" / "run"), _params(tmp_path / "cut" / "run")))
    lines = lambda d: [{k: v for k, v in json.loads(s).items() if k != "train_seconds"}  # noqa: E731
                       for s in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines("full") == lines("cut")


def test_resume_refuses_a_different_config(small_mnist, tmp_path):
    train(cfg(tmp_path, rule="bp", epochs=1), small_mnist)
    with pytest.raises(ValueError, match="differs from the checkpoint in lr"):
        train(cfg(tmp_path, rule="bp", epochs=2, lr=0.5), small_mnist, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg(tmp_path / "elsewhere", rule="bp"), small_mnist, resume=True)


def test_resume_with_alignment_log_cut_short_or_damaged(small_mnist, tmp_path):
    """A run stopped while appending to alignment.jsonl leaves its last line cut short: resuming drops it with the
    records after the checkpoint. A damaged line before the last is named, not met with a JSON decoder's message."""
    c = cfg(tmp_path, rule="ftp", epochs=1, log_alignment=20)
    train(c, small_mnist)
    log = tmp_path / "run" / "alignment.jsonl"
    records = log.read_text()
    log.write_text(records + '{"epoch": 2, "step": 1, "lay')  # epoch 2's first record, cut short
    train(dataclasses.replace(c, epochs=2), small_mnist, resume=True)
    train(cfg(tmp_path / "whole", rule="ftp", epochs=2, log_alignment=20), small_mnist)
    steps = lambda path: [(r["epoch"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]  # noqa: E731
    assert steps(log) == steps(tmp_path / "whole" / "run" / "alignment.jsonl") and steps(log)[-1][0] == 2
    log.write_text("not a record\n" + records)
    with pytest.raises(ValueError, match=f"--resume: {log} line 1 is not an alignment record"):
        train(dataclasses.replace(c, epochs=3), small_mnist, resume=True)


class NaNAfter(BP):
    """BP that reports a non-finite loss at a given global step (to exercise divergence handling)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def step(self, model, x, y) -> StepOutput:
        self.calls += 1
        out = super().step(model, x, y)
        return StepOutput(out.loss * float("nan"), out.logits) if self.calls == self.at else out


def test_divergence_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(small_mnist, tmp_path, monkeypatch):
    steps_per_epoch = -(-len(small_mnist.y_train) // 64)
    monkeypatch.setattr(train_mod, "make_rule", lambda name, **o: NaNAfter(steps_per_epoch + 5))
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 5.*last good checkpoint \(epoch 1\)"):
        train(cfg(tmp_path, rule="bp", epochs=3), small_mnist)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(p).all() for p in ckpt["model"].values())
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "epoch 2, step 5" in summary["diverged"] and summary["epochs"] == 1


def test_real_divergence_is_caught(small_mnist, tmp_path):
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train(cfg(tmp_path, rule="bp", activation="relu", lr=1e4, momentum=0.0, epochs=1), small_mnist)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown key.*hiden"):
        TrainConfig.from_dict({"hiden": "10"})
    with pytest.raises(ValueError, match="comma-separated list of positive integers"):
        TrainConfig(hidden="10,x")
    with pytest.raises(ValueError, match="non-empty list of positive integers"):
        TrainConfig(hidden="0")
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="lbfgs")
    c = TrainConfig.from_dict({"hidden": [32, 16], "rule": {"name": "ftp", "gamma": 0.2}})
    assert c.hidden == "32,16" and c.rule == "ftp" and c.rule_options == {"gamma": 0.2}


def test_alignment_logging(small_mnist, tmp_path):
    """BP aligns perfectly with itself; FTP's output layer is BP's exactly; logging changes nothing in the run."""
    bp = train(cfg(tmp_path / "bp", rule="bp", epochs=1, log_alignment=10), small_mnist)
    rows = [json.loads(line) for line in (tmp_path / "bp" / "run" / "alignment.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 64, 10))  # 63 steps per epoch
    assert all(abs(layer["cosine"] - 1) < 1e-5 for r in rows for layer in r["layers"])

    spec = dict(model="spec", spec="f-l64-bn-relu-d0.2-l32-relu-l10")  # dropout and batch norm: RNG and buffers
    logged = train(cfg(tmp_path / "ftp", rule="ftp", epochs=2, log_alignment=7, **spec), small_mnist)
    plain = train(cfg(tmp_path / "plain", rule="ftp", epochs=2, **spec), small_mnist)
    assert logged["test_accuracy"] == plain["test_accuracy"]
    ckpt = lambda d: torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False)["model"]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(ckpt("ftp").values(), ckpt("plain").values()))
    rows = [json.loads(line) for line in (tmp_path / "ftp" / "run" / "alignment.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and rows[-1]["epoch"] == 2
    last = rows[-1]["layers"]
    assert abs(last[-1]["cosine"] - 1) < 1e-5  # the output layer's update is the cross-entropy gradient itself
    assert all(-1 <= layer["cosine"] < 0.9999 for layer in last[:-1]) and bp["test_accuracy"] > 0


def _code_version_with(monkeypatch, answers: dict[str, str] | None) -> str:
    """report.code_version() with git answering `answers` (keyed by the command's first two words), or no git."""
    import subprocess

    def fake_run(cmd, **kwargs):
        if answers is None:
            raise FileNotFoundError("git")
        return subprocess.CompletedProcess(cmd, 0, stdout=answers[" ".join(cmd[3:5])] + "\n")

    monkeypatch.setattr(report.subprocess, "run", fake_run)
    report.code_version.cache_clear()
    try:
        return report.code_version()
    finally:
        report.code_version.cache_clear()


def test_code_version_names_the_commit_and_whether_the_package_differs(monkeypatch):
    top = str(__import__("pathlib").Path(report.__file__).resolve().parent.parent)
    clean = {"rev-parse --show-toplevel": top, "rev-parse --short=7": "abc1234", "status --porcelain": ""}
    assert _code_version_with(monkeypatch, clean) == "git abc1234"
    assert _code_version_with(monkeypatch, clean | {"status --porcelain": " M ftprop/train.py"}) == "git abc1234+dirty"
    # a copy inside some other repository is not that repository's commit; no git at all gives the package version
    assert _code_version_with(monkeypatch, clean | {"rev-parse --show-toplevel": "/elsewhere"}) == f"ftprop {ftprop.__version__}"
    assert _code_version_with(monkeypatch, None) == f"ftprop {ftprop.__version__}"


def test_code_version_of_this_checkout():
    import subprocess
    from pathlib import Path
    top = Path(report.__file__).resolve().parent.parent
    if not (top / ".git").exists():
        pytest.skip("ftprop is not imported from a git checkout")
    head = subprocess.run(["git", "-C", str(top), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert report.code_version() in (f"git {head}", f"git {head}+dirty")


def test_shift_images_equals_padding_and_cropping_each_image():
    """The batched gather is the per-image recipe: reflect-pad by k, keep the H x W window at the drawn offset."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, 7, 5, generator=gen)
    offsets = torch.randint(0, 5, (9, 2), generator=gen)
    want = torch.stack([torch.nn.functional.pad(img[None], (2,) * 4, mode="reflect")[0, :, r:r + 7, c:c + 5]
                        for img, (r, c) in zip(x, offsets.tolist())])
    assert torch.equal(shift_images(x, offsets, 2), want)
    assert torch.equal(shift_images(x, torch.full((9, 2), 2), 2), x)  # offset k: no move
    assert shift_images(x, offsets, 0) is x
    with pytest.raises(ValueError, match="shift 5 must be smaller than the images' height and width"):
        shift_images(x, offsets, 5)


def test_shift_translates_training_images_only(tmp_path, monkeypatch):
    """Every image a rule trains on is one training image moved by at most `shift` pixels, the moves vary, and
    evaluation sees the images as they are; the same seed draws the same moves."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    data = Dataset("tiny", x[:24], y[:24], x[24:32], y[24:32], x[32:], y[32:], 3, list("abc"))
    seen, evaluated = [], []
    real_rule, real_evaluate = train_mod.make_rule, train_mod.evaluate

    def recording_rule(*a, **k):
        rule = real_rule(*a, **k)
        step = rule.step
        rule.step = lambda model, xb, yb: (seen.append(xb.clone()), step(model, xb, yb))[1]
        return rule

    monkeypatch.setattr(train_mod, "make_rule", recording_rule)
    monkeypatch.setattr(train_mod, "evaluate",
                        lambda m, r, xe, ye: (evaluated.append(xe), real_evaluate(m, r, xe, ye))[1])
    train(cfg(tmp_path / "a", rule="bp", hidden="8", epochs=2, batch_size=8, shift=1), data)
    moved = torch.cat(seen)
    assert len(moved) == 48
    padded = torch.nn.functional.pad(x[:24], (1,) * 4, mode="reflect")
    candidates = torch.stack([padded[:, :, r:r + 6, c:c + 6] for r in range(3) for c in range(3)], 1)  # (24, 9, ...)
    found = [(candidates == img).flatten(2).all(2).nonzero() for img in moved]
    assert all(len(f) >= 1 for f in found)  # each is some training image at some offset
    moves = {int(f[0, 1]) for f in found}
    assert len(moves) > 3 and 4 in moves  # offsets vary, and "no move" is one of them
    assert all(e is data.x_val or e is data.x_test for e in evaluated)
    first = moved.clone()
    seen.clear()
    train(cfg(tmp_path / "b", rule="bp", hidden="8", epochs=2, batch_size=8, shift=1), data)
    assert torch.equal(torch.cat(seen), first)


def test_shift_validation_and_cli():
    with pytest.raises(ValueError, match="shift must be >= 0"):
        TrainConfig(shift=-1)
    assert _config(parser().parse_args(["train", "--shift", "2"])).shift == 2


def test_a_fresh_run_removes_the_old_results_before_it_records_its_config(small_mnist, tmp_path, monkeypatch):
    """config.json says which run a directory holds (compare --resume reuses metrics.json by it): a run interrupted
    before its first epoch ended once left its own config beside the previous run's metrics.json and checkpoint."""
    train(cfg(tmp_path, rule="bp", hidden="16", epochs=1), small_mnist)
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, rule="bp", hidden="16", epochs=1, lr=0.02), small_mnist)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["lr"] == 0.02
    assert not (run / "metrics.json").exists() and not (run / "checkpoint.pt").exists()


def test_extending_a_cosine_run_continues_on_the_new_total_schedule(small_mnist, tmp_path):
    """A 1-epoch cosine run ends at lr 0; resumed with --epochs 3 it once trained on at lr 0. Cosine's first epoch is
    the same for every total, so the extended run is the 3-epoch run, bit for bit."""
    straight = train(cfg(tmp_path / "straight", rule="ftp", hidden="16", epochs=3, schedule="cosine"), small_mnist)
    train(cfg(tmp_path / "ext", rule="ftp", hidden="16", epochs=1, schedule="cosine"), small_mnist)
    extended = train(cfg(tmp_path / "ext", rule="ftp", hidden="16", epochs=3, schedule="cosine"), small_mnist,
                     resume=True)
    assert extended["test_accuracy"] == straight["test_accuracy"]
    straight_params, extended_params = _params(tmp_path / "straight" / "run"), _params(tmp_path / "ext" / "run")
    assert all(torch.equal(a, b) for a, b in zip(straight_params, extended_params))


def test_resume_refuses_fewer_epochs_than_trained_and_needs_a_run_directory(small_mnist, tmp_path):
    train(cfg(tmp_path, rule="bp", hidden="16", epochs=2), small_mnist)
    with pytest.raises(ValueError, match="already trained 2 epochs, more than the 1 asked for"):
        train(cfg(tmp_path, rule="bp", hidden="16", epochs=1), small_mnist, resume=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2  # left as it was
    with pytest.raises(ValueError, match="--resume needs --out"):
        train(cfg(tmp_path, rule="bp", hidden="16", out=None), small_mnist, resume=True)


def test_without_a_validation_split_no_test_accuracy_at_best_val_is_made_up():
    nan = float("nan")
    history = [{"val_accuracy": nan, "test_accuracy": 0.5, "train_seconds": 1.0},
               {"val_accuracy": nan, "test_accuracy": 0.7, "train_seconds": 1.0}]
    summary = train_mod._summary(history, 2.0, None)
    assert summary["best_val_accuracy"] is None and summary["test_accuracy_at_best_val"] is None
    assert summary["test_accuracy"] == 0.7


@pytest.mark.parametrize("values, message", [
    ({"epochs": "3"}, "epochs must be an integer, got '3'"),
    ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
    ({"batch_size": 64.0}, "batch_size must be an integer, got 64.0"),
    ({"val_size": 1.5}, "val_size must be an integer"),
    ({"lr": "0.1"}, "lr must be a number, got '0.1'"),
    ({"shift": True}, "shift must be an integer, got True"),
    ({"hidden": 1.5}, "hidden must be a string"),
    ({"rule": 3}, "rule must be a string"),
    ({"progress": "maybe"}, "progress must be a boolean"),
    ({"lr_decay": -1.0}, "lr_decay must be > 0"),
    ({"log_alignment": -1}, "log_alignment must be >= 0"),
    ({"lr": float("inf")}, "lr must be > 0 and finite, got inf"),
    ({"momentum": -0.5}, "momentum must be in [0, 1), got -0.5"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0 and finite, got -0.0001"),
    ({"weight_decay": float("nan")}, "weight_decay must be >= 0 and finite, got nan"),
    ({"rule": {"name": "ftp", "gamma": "abc"}}, "ftp: option gamma must be a number, got 'abc'"),
])
def test_config_values_of_the_wrong_type_name_the_key(values, message):
    with pytest.raises(ValueError, match="^c.toml: " + __import__("re").escape(message)):
        TrainConfig.from_dict(values, source="c.toml")


def test_config_values_are_held_as_their_fields_types():
    c = TrainConfig.from_dict({"hidden": 32, "lr": 1, "depth": None, "rule": {"name": "ftp", "tangent": "false"}})
    assert c.hidden == "32" and c.lr == 1.0 and isinstance(c.lr, float) and c.depth is None
    assert c.rule_options == {"tangent": False}


def test_unknown_device_is_named():
    with pytest.raises(ValueError, match="unknown device 'foo'; use cpu, cuda, cuda:N or auto"):
        train_mod.resolve_device("foo")


@pytest.mark.parametrize("schedule, expected", [
    ("none", [0.1, 0.1, 0.1, 0.1]),
    ("step", [0.1, 0.1, 0.05, 0.05]),  # lr_step 2, lr_decay 0.5
    ("cosine", [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),  # 0.1, 0.085, 0.05, 0.015
])
def test_metrics_log_the_lr_each_epoch_trained_with(tmp_path, schedule, expected):
    """Each metrics.jsonl line holds the rate its epoch's steps used (read from the optimizer at every step), not
    the next epoch's: the last cosine epoch trains at 0.015, not 0."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 2, 2, generator=gen), torch.arange(8) % 2
    data = Dataset("toy", x, y, x[:0], y[:0], x, y, 2, ["a", "b"])
    seen: list[float] = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", step)
        train(TrainConfig(hidden="4", epochs=4, batch_size=8, lr=0.1, schedule=schedule, lr_step=2, lr_decay=0.5,
                          rule="bp", progress=False, val_size=0, out=str(tmp_path / "run")), data)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert seen == pytest.approx(expected) and logged == pytest.approx(expected)


def test_momentum_is_adams_beta1():
    """--momentum reaches the optimizer either way: SGD's momentum, Adam's beta1 (0.9, the default, is torch's)."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = train_mod.make_optimizer(TrainConfig(optimizer="adam", momentum=0.5, weight_decay=1e-3), params)
    assert adam.defaults["betas"] == (0.5, 0.999) and adam.defaults["weight_decay"] == 1e-3
    assert train_mod.make_optimizer(TrainConfig(optimizer="adam"), params).defaults["betas"] == \
        torch.optim.Adam(params).defaults["betas"]
    sgd = train_mod.make_optimizer(TrainConfig(momentum=0.5, weight_decay=1e-3), params)
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.5, 1e-3)


def test_alignment_of_a_block_the_rule_left_unchanged_is_none_not_90_degrees():
    """A zero update has no direction: FF leaves its output block at zero, which was logged as cosine 0, 90 degrees."""
    from ftprop.diagnostics import alignment
    from ftprop.models import build_model
    from ftprop.rules import make_rule
    torch.manual_seed(0)
    net = build_model("mlp", (1, 4, 4), 3, hidden="8", activation="relu")
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    make_rule("ff").step(net, x, y)
    rows = alignment(net, x, y)
    assert rows[-1] == {"block": 1, "cosine": None, "angle_deg": None}
    assert all(p.grad.abs().sum() == 0 for p in net.blocks[-1].parameters())  # what the None stands for
    assert rows[0]["cosine"] is not None and 0 <= rows[0]["angle_deg"] <= 180
    make_rule("bp").step(net, x, y)
    assert all(abs(r["cosine"] - 1) < 1e-6 for r in alignment(net, x, y))
