"""Data-parallel training: 2 gloo processes at global batch B equal 1 process at batch B, and stay identical.

One group of 2 CPU processes (spawned once for the module, as torchrun would start them: RANK, WORLD_SIZE, ...)
trains every case on a tiny synthetic dataset; each rank saves its final parameters and rule state, and the tests
compare them with each other and with the same run in this process.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from ftprop import cli, distributed
from ftprop.data import Dataset, DatasetError
from ftprop.train import TrainConfig, train

train_mod = importlib.import_module("ftprop.train")  # `ftprop.train` the attribute is the function

WORLD = 2
# Cases whose result must equal one process's: every rule's update is a mean of per-sample terms (distributed.py).
EQUAL = {
    "bp": {"rule": "bp"},
    "ftp": {"rule": "ftp"},
    "ftp-relu-adam": {"rule": "ftp", "activation": "relu", "optimizer": "adam", "lr": 0.003},
    "ftp-pipelined": {"rule": "ftp", "rule_options": {"pipeline": True}},
    "fa": {"rule": "fa"},
    "dfa": {"rule": "dfa"},
    "drtp": {"rule": "drtp"},
    "pepita": {"rule": "pepita"},
    "dtp": {"rule": "dtp"},  # inverses trained inside the rule, noise drawn per sample
    "ff": {"rule": "ff"},    # wrong labels drawn per sample
    "ftp-short-last-batch": {"rule": "ftp", "batch_size": 20},  # 96 = 4 x 20 + 16: the last shards are 8 each
    "ftp-shift": {"rule": "ftp", "shift": 1},  # translations drawn for the global batch, each rank takes its shard
}
# Cases that use batch statistics: not the one-process result, but the ranks must still agree.
AGREE = {
    "ftp-quant": {"rule": "ftp", "quant": "w8a8e8u8", "rounding": "stochastic"},
    "ftp-batchnorm": {"rule": "ftp", "model": "spec", "spec": "f-l16-bn-tanh-l8-tanh-l4"},
    "ftp-analog": {"rule": "ftp", "analog": "reram"},
}
RESUMED = ("ftp", "dtp", "ftp-shift")  # also run as 1 epoch + resume to 2
# Ranks started with different settings (per rank: rank 0's, rank 1's) and --resume on one rank only.
MISMATCHED = [
    ("mismatch-seed-lr-rule", {"seed": (0, 1), "lr": (0.05, 0.1), "rule": ("ftp", "fa")}, (False, False)),
    ("mismatch-batch-size", {"batch_size": (32, 16)}, (False, False)),
    ("mismatch-resume", {}, (False, True)),
]


def tiny_data(n: int = 96) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 40, 1, 6, 6, generator=gen)
    y = torch.randint(0, 4, (n + 40,), generator=gen)
    return Dataset("tiny", x[:n], y[:n], x[n:n + 20], y[n:n + 20], x[n + 20:], y[n + 20:], 4, list("abcd"))


def config(out: Path, epochs: int = 2, **kw: Any) -> TrainConfig:
    base = dict(hidden="16,8", epochs=epochs, batch_size=32, lr=0.05, progress=False, out=str(out))
    return TrainConfig(**{**base, **kw})


def run(cfg: TrainConfig, data: Dataset, resume: bool = False) -> dict[str, Any]:
    """Train and return this process's final parameters and rule state (captured where train builds them)."""
    built: dict[str, Any] = {}
    build_model, make_rule = train_mod.build_model, train_mod.make_rule
    train_mod.build_model = lambda *a, **k: built.setdefault("model", build_model(*a, **k))
    train_mod.make_rule = lambda *a, **k: built.setdefault("rule", make_rule(*a, **k))
    try:
        train(cfg, data, resume=resume)
    finally:
        train_mod.build_model, train_mod.make_rule = build_model, make_rule
    return {"params": [p.detach().clone() for p in built["model"].parameters()],
            "buffers": [b.clone() for b in built["model"].buffers()], "rule": built["rule"].state_dict()}


def _as_rank(rank: int, port: int) -> None:
    """Give this process the environment torchrun gives rank `rank` of WORLD."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


def _worker(rank: int, port: int, data: Dataset, root: str) -> None:
    _as_rank(rank, port)
    results: dict[str, Any] = {}
    for name, kw, resume in MISMATCHED:  # each rank given its own settings: every rank must refuse, before training
        try:
            train(config(Path(root) / name, **{k: v[rank] for k, v in kw.items()}), data, resume=resume[rank])
        except ValueError as err:
            results[name] = str(err)
    results.update({name: run(config(Path(root) / name, **kw), data) for name, kw in {**EQUAL, **AGREE}.items()})
    for name in RESUMED:
        out = Path(root) / f"{name}-resumed"
        run(config(out, epochs=1, **EQUAL[name]), data)
        results[f"{name}-resumed"] = run(config(out, **EQUAL[name]), data, resume=True)
    torch.save(results, Path(root) / f"rank{rank}.pt")
    distributed.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker: Any, *args: Any, timeout: float = 120) -> None:
    """Run worker(rank, port, *args) in WORLD processes, as torchrun would start them; fail after `timeout` s."""
    procs = mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"the {WORLD}-process run did not finish within {timeout:.0f} s")


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def ranks(ddp_root) -> list[dict[str, Any]]:
    root = ddp_root
    _spawn(_worker, tiny_data(), str(root))
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of nested rule state (tensors, lists, dicts, plain values)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", [*EQUAL, *AGREE, *(f"{n}-resumed" for n in RESUMED)])
def test_ranks_stay_identical(ranks, name):
    """Parameters, buffers (batch-norm running statistics) and rule state (G, B, DTP's inverses, generator states)
    are bit-identical on both ranks after training."""
    a, b = ranks[0][name], ranks[1][name]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
    assert all(torch.equal(p, q) for p, q in zip(a["buffers"], b["buffers"]))
    assert _equal(a["rule"], b["rule"])


@pytest.mark.parametrize("name", EQUAL)
def test_two_processes_equal_one(ranks, tmp_path, name):
    """2 processes at global batch B give the parameters of 1 process at batch B, to float32 rounding."""
    one = run(config(tmp_path / name, **EQUAL[name]), tiny_data())
    for p, q in zip(ranks[0][name]["params"], one["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    if name == "dtp":
        for v, w in zip(ranks[0][name]["rule"]["inverses"], one["rule"]["inverses"]):
            torch.testing.assert_close(v, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", RESUMED)
def test_resume_equals_uninterrupted(ranks, name):
    """1 epoch, then resuming from the checkpoint to 2 epochs, gives the uninterrupted 2-process run bit for bit."""
    a, b = ranks[0][name], ranks[0][f"{name}-resumed"]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
    assert _equal(a["rule"], b["rule"])


def test_batch_statistics_cases_differ_from_one_process(ranks, tmp_path):
    """Batch norm computes its statistics per shard: documented as not equal (docs/SCALING.md); this pins that the
    equality tests above would notice a difference of that kind."""
    one = run(config(tmp_path / "bn", **AGREE["ftp-batchnorm"]), tiny_data())
    assert not all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ranks[0]["ftp-batchnorm"]["params"],
                                                                  one["params"]))


@pytest.mark.parametrize("name, keys", [("mismatch-seed-lr-rule", ("lr", "rule", "seed")),
                                       ("mismatch-batch-size", ("batch_size",)), ("mismatch-resume", ("resume",))])
def test_ranks_with_different_settings_are_refused(ranks, name, keys):
    """Ranks given other seeds, learning rates or rules trained on silently (the start-up broadcast hid it) and
    averaged unrelated updates; another batch size failed inside gloo. Now every rank refuses, naming each setting."""
    for r in range(WORLD):
        message = ranks[r].get(name)
        assert message is not None and "started with different settings" in message
        assert [k for k in ("batch_size", "lr", "resume", "rule", "seed") if f"{k}: rank 0" in message] == list(keys)


@pytest.mark.parametrize("argv", [["compare", "--rules", "bp,ftp"], ["bench"], ["cost"], ["sequences"],
                                  ["reproduce", "all"], ["data", "info", "mnist"]])
def test_commands_other_than_train_refuse_torchrun(monkeypatch, capsys, argv):
    """Under torchrun every rank ran its own copy of compare (its inner runs joining the process group as
    data-parallel ones) or of the others, each rank writing the same table and results; now they refuse at once."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("compare", "bench", "cost", "sequences", "reproduce", "data"):  # were the check to miss, nothing
        monkeypatch.setattr(cli, f"cmd_{name}", lambda args: 0)               # would run (reproduce rewrites docs/)
    assert cli.main(argv) == 2
    assert f"ftprop {argv[0]} runs in one process" in capsys.readouterr().err


def test_shard_and_batch_size_checks():
    ctx = distributed.Context(rank=1, world=2)
    assert distributed.shard(torch.arange(8), ctx).tolist() == [4, 5, 6, 7]
    assert distributed.shard(torch.arange(5), ctx).tolist() == [2, 3]  # a short last batch: cut to equal shards
    assert distributed.shard(torch.arange(5), distributed.Context()).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        distributed.check_batch_size(33, ctx)


def test_only_rank_zero_writes(ranks, ddp_root):
    """The run directory holds rank 0's files once (config, metrics, checkpoint), nothing per rank."""
    assert sorted(f.name for f in (ddp_root / "ftp").iterdir()) == ["checkpoint.pt", "config.json", "metrics.json",
                                                                    "metrics.jsonl"]


def _cli_worker(rank: int, port: int, data: Dataset, root: str, argv: list[str], without_data: int = -1) -> None:
    """`ftprop ARGV` as this rank of a torchrun launch (training on `data`, which rank `without_data` cannot find);
    saves its exit status and stderr."""
    _as_rank(rank, port)

    def load(*args: Any, **kwargs: Any) -> Dataset:
        if rank == without_data:
            raise DatasetError("MNIST not found. Looked in: here")
        return data
    train_mod.load_dataset = load
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    (Path(root) / f"rank{rank}.json").write_text(json.dumps([code, err.getvalue()]))


def test_out_that_rank_zero_cannot_create_stops_every_rank(tmp_path):
    """--out naming a file: rank 0, which alone writes the run directory, said so and exited, while rank 1 trained on
    into a collective that rank 0 never joined and died in gloo with a traceback. Now every rank prints rank 0's line
    and exits 2."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    _spawn(_cli_worker, tiny_data(), str(tmp_path), ["train", "--out", str(afile), "--hidden", "16,8", "--epochs", "1",
                                                     "--batch-size", "32", "--no-progress"], timeout=60)
    for r in range(WORLD):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == [
            2, f"ftprop: error: --out {afile} is a file, not a directory; choose another --out\n"]


def test_data_one_rank_cannot_find_stops_every_rank(tmp_path):
    """Each rank reads its own copy of the data (--data-dir may differ between machines). Rank 1 without it raised
    alone, and rank 0 waited for it in the model's broadcast and died in gloo; now both print rank 1's line, exit 2."""
    _spawn(_cli_worker, tiny_data(), str(tmp_path), ["train", "--out", str(tmp_path / "run"), "--hidden", "16,8",
                                                     "--epochs", "1", "--batch-size", "32", "--no-progress"], 1,
           timeout=60)
    for r in range(WORLD):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == [
            2, "ftprop: error: rank 1 cannot read its data: MNIST not found. Looked in: here\n"]
