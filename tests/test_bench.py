"""The benchmark's counters: FLOPs against the MACs counted by hand, and the peak-memory tracker on known tensors."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from ftprop.bench import PeakMemory, alignment_overhead, benchmark, median_interval
from ftprop.models import mlp
from ftprop.rules import make_rule
from ftprop.train import TrainConfig


def test_flops_match_hand_counted_macs():
    """784-1024-128-10: BP = forward + weight grads + input grads of layers 2..L (2.003M MACs, the authors'
    spreadsheet); FTP = forward + weight grads + second pass through layer 2 + the G projection(s)."""
    sizes = [784, 1024, 128, 10]
    layers = list(zip(sizes[:-1], sizes[1:]))
    forward = sum(a * b for a, b in layers)
    bp_macs = 2 * forward + sum(a * b for a, b in layers[1:])
    ftp_linear = 2 * forward + 1024 * 128 + 10 * 1024
    ftp_tanh = 2 * forward + 1024 * 128 + 2 * 10 * 1024
    assert round(bp_macs / 1e6, 3) == 2.003  # the published table's BP figure
    assert abs(ftp_tanh / 2.023e6 - 1) < 0.001  # the published FTP figure (two projections through G)
    x = torch.randn(500, 784)
    y = torch.randint(0, 10, (500,))
    res = benchmark({"bp": make_rule("bp"), "ftp": make_rule("ftp"), "ftp_tanh": make_rule("ftp", target_nonlin="tanh")},
                    lambda: mlp(784, (1024, 128), 10), x, y, batch_size=8, rounds=1, steps_per_round=1, warmup=1)
    assert res["bp"]["flops_per_sample"] == 2 * bp_macs
    assert res["ftp"]["flops_per_sample"] == 2 * ftp_linear
    assert res["ftp_tanh"]["flops_per_sample"] == 2 * ftp_tanh
    assert res["bp"]["ratio_to_bp"] == 1.0 and res["ftp"]["ratio_to_bp"] > 0


def test_repeats_take_the_median_of_each_repeats_ratio_with_fresh_models(monkeypatch):
    """A fake clock that each step advances by a cost set per rule and repeat: the ratio is the median of the
    repeats' ratios (not the ratio of pooled medians), its range is reported, and every repeat builds new models."""
    import ftprop.bench as bench

    clock, built = [0.0], []
    costs = {"bp": [1.0, 1.0, 2.0], "ftp": [1.1, 1.3, 2.4]}  # ratios 1.1, 1.3, 1.2 -> median 1.2
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def step(model, rule, opt, x, y):
        clock[0] += costs[rule.name][(len(built) - 1) // 2]  # two models built per repeat

    monkeypatch.setattr(bench, "_step", step)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    res = benchmark({"bp": make_rule("bp"), "ftp": make_rule("ftp")}, lambda: built.append(1) or mlp(6, (4,), 3),
                    x, y, batch_size=8, rounds=3, steps_per_round=2, warmup=1, repeats=3)
    assert len(built) == 6 and res["ftp"]["repeats"] == 3
    assert res["ftp"]["ratio_to_bp"] == pytest.approx(1.2) and res["ftp"]["ratio_range"] == pytest.approx((1.1, 1.3))
    assert res["ftp"]["step_time_median_s"] == pytest.approx(1.3) and res["bp"]["step_time_median_s"] == 1.0
    assert res["ftp"]["step_time_iqr_s"] > 0  # over the rounds of all repeats
    assert res["ftp"]["ratio_ci"] is None and res["bp"]["ratio_ci"] is None  # 3 repeats: too few for a 95% interval
    one = benchmark({"bp": make_rule("bp")}, lambda: mlp(6, (4,), 3), x, y, batch_size=8, rounds=2, steps_per_round=1,
                    warmup=0)
    assert one["bp"]["ratio_range"] is None and one["bp"]["repeats"] == 1
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        benchmark({"bp": make_rule("bp")}, lambda: mlp(6, (4,), 3), x, y, batch_size=8, repeats=0)


def test_median_interval_is_the_binomial_order_statistics_and_covers_the_median():
    """The interval's ranks by hand: P(Bin(15, 1/2) <= 3) = 576 / 2^15 = 0.0176 <= 0.025 < P(<= 4) = 0.0592, so the
    4th and 12th of 15 values (coverage 1 - 2 * 0.0176 = 0.965); 6 values give their range (1 - 2 / 64 = 0.969),
    5 none (2 / 32 > 0.05). Then coverage on a skewed distribution, seeded: it must be what the ranks promise."""
    values = [float(v) for v in (9, 3, 14, 1, 7, 12, 5, 15, 2, 10, 8, 4, 13, 6, 11)]  # 1..15, shuffled
    assert median_interval(values) == (4.0, 12.0)
    assert median_interval([float(v) for v in range(30, 0, -1)]) == (10.0, 21.0)
    assert median_interval([2.0, 1.0, 6.0, 3.0, 5.0, 4.0]) == (1.0, 6.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None and median_interval([]) is None
    # level 0.5: P(Bin(15, 1/2) <= 5) = 0.151 <= 0.25 < P(<= 6) = 0.304, so the 6th and 10th
    assert median_interval([float(v) for v in range(1, 16)], level=0.5) == (6.0, 10.0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.empty(4000, 15).exponential_(generator=gen)  # median log 2
    hits = sum(lo <= 0.6931471805599453 <= hi for lo, hi in map(median_interval, draws.tolist()))
    assert abs(hits / 4000 - (1 - 2 * 576 / 2 ** 15)) < 0.012  # about 4 standard errors of a 4000-draw proportion
    with pytest.raises(ValueError, match="level must be in"):
        median_interval(values, level=1.0)


def test_peak_memory_tracks_live_storage():
    with PeakMemory() as mem:
        a = torch.zeros(1000)             # 4000 bytes
        b = torch.zeros(2000)             # +8000 -> 12000
        del a, b
        c = torch.ones(500)               # 2000 after the others are freed
        d = c.view(5, 100)                # a view shares storage: no new bytes
        e = torch.empty(0) + 1            # noqa: F841
    assert mem.peak == 12000
    assert mem.current == 2000 + 0 and d.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()


def test_alignment_overhead_times_the_training_loop_with_exactly_the_records_asked(small_mnist, monkeypatch):
    loop = importlib.import_module("ftprop.train")  # the module (the package exports the function `train`)
    calls = []
    real = loop.alignment
    monkeypatch.setattr(loop, "alignment", lambda *a: calls.append(1) or real(*a))
    cfg = TrainConfig(hidden="16", batch_size=8, rule="ftp")
    r = alignment_overhead(cfg, small_mnist, every=5, rounds=2, records=3)
    assert r["steps_per_epoch"] == 15 and r["rounds"] == 2
    assert len(calls) == 2 * 3  # 3 records per logged epoch, none in the unlogged ones
    assert r["epoch_s_off"] > 0 and r["epoch_s_on"] > 0
    assert abs(r["overhead"] - (r["epoch_s_on"] / r["epoch_s_off"] - 1)) < 1e-12


def test_alignment_overhead_refuses_a_window_larger_than_the_data(small_mnist):
    with pytest.raises(ValueError, match="need .* training samples"):
        alignment_overhead(TrainConfig(hidden="16", batch_size=64), small_mnist, every=100, rounds=1)


def test_benchmark_refuses_no_steps_and_negative_rounds_naming_the_option(small_mnist):
    """--steps 0 failed with an IndexError inside the FLOP count, --rounds -1 printed a table of no timings under a
    header claiming -1 rounds, and --log-alignment with --rounds 0 failed with 'no median for empty data'."""
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    args = ({"bp": make_rule("bp")}, lambda: mlp(6, (4,), 3), x, y)
    with pytest.raises(ValueError, match=r"--steps\), got 0"):
        benchmark(*args, batch_size=8, rounds=1, steps_per_round=0)
    with pytest.raises(ValueError, match=r"--rounds.*got -1"):
        benchmark(*args, batch_size=8, rounds=-1, steps_per_round=1)
    assert benchmark(*args, batch_size=8, rounds=0, steps_per_round=1)["bp"]["ratio_to_bp"] is None  # still allowed
    with pytest.raises(ValueError, match=r"--log-alignment\), rounds \(--rounds\).*got 5, 0"):
        alignment_overhead(TrainConfig(hidden="16", batch_size=8), small_mnist, every=5, rounds=0)


def test_cli_keeps_freed_memory_under_glibc_unless_told_not_to(monkeypatch, capsys):
    """`ftprop` commands set glibc's malloc so that freed step memory is reused (ftprop.runtime), say so in the
    machine line of every table, and leave it alone with FTPROP_MALLOC=default or without glibc."""
    import platform

    from ftprop import cli, report, runtime

    calls = []
    monkeypatch.setattr(runtime, "MALLOC", "default")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: type("Libc", (), {
        "mallopt": staticmethod(lambda param, value: calls.append((param, value)) or 1)})())
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setenv("FTPROP_MALLOC", "default")
    assert not runtime.keep_freed_memory() and calls == [] and report.machine().endswith("malloc default")
    monkeypatch.delenv("FTPROP_MALLOC")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS, Windows: nothing to set
    assert not runtime.keep_freed_memory() and calls == []
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert cli.main(["cost", "--hidden", "8", "--rules", "bp"]) == 0
    assert calls == [(runtime.M_MMAP_THRESHOLD, 32 << 20), (runtime.M_TRIM_THRESHOLD, 1 << 30)]
    assert report.machine().endswith("malloc freed memory kept (ftprop.runtime)")


def test_ftp_measuring_after_the_pool_runs_under_the_counters():
    """compare_at="next-input" differentiates through the next block's pool inside FTP's step (autograd's J and J^T,
    except behind a max-pool); torch's flop counter hooks every module, and autograd.grad with respect to a module's
    leaf input then raised (`ftprop bench` on the paper CNN failed). Under the counters the step gives the same
    gradients as without them, behind an average pool (autograd's path) and a max-pool (the positions)."""
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    for pool in (nn.AvgPool2d(2), nn.MaxPool2d(2)):
        def make() -> nn.Sequential:
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool, nn.Flatten(), nn.Linear(18, 3))

        grads = []
        for counted in (False, True):
            net = make()
            with FlopCounterMode(display=False) if counted else contextlib.nullcontext():
                make_rule("ftp", compare_at="next-input", g_block=2).step(net, x, y)
            grads.append([p.grad for p in net.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
        res = benchmark({"ftp": make_rule("ftp", compare_at="next-input")}, make, x, y, batch_size=6, rounds=0,
                        steps_per_round=1, warmup=1)
        assert res["ftp"]["flops_per_step"] > 0 and res["ftp"]["peak_memory_bytes"] > 0


def test_machine_line_names_the_cpu_and_its_vector_instructions() -> None:
    """Step-time ratios move with the host (docs/ALGORITHM.md: the residual CNN's BP step took 50 ms on one 2-core box
    and 19 ms on another), so every table's machine line says which CPU and which of torch's kernels ran."""
    import platform

    from ftprop import report

    line = report.machine()
    assert line.startswith(f"{platform.machine()} (") and f", {torch.backends.cpu.get_cpu_capability()})" in line
