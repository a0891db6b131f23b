"""The hardware and depth studies end to end on a tiny budget: runs, tables, verdicts and plots."""
from __future__ import annotations

import json
import re

import ftprop.compare
import ftprop.reproduce as rep
import ftprop.study_scaling as sc


def spy_runs(monkeypatch, record):
    """Wrap run_compare so that each call appends record(base, rules as a tuple, out, rule_configs) to the list
    returned, then trains as usual."""
    seen = []
    real = ftprop.compare.run_compare

    def spy(base, rules, seeds, out, *a, rule_configs=None, **k):
        seen.append(record(base, tuple(rules), out, rule_configs))
        return real(base, rules, seeds, out, *a, rule_configs=rule_configs, **k)

    monkeypatch.setattr(ftprop.compare, "run_compare", spy)
    return seen


def test_quant_for():
    assert sc.quant_for(32) == "" and sc.quant_for(8) == "w8a8e8u8" and sc.quant_for(4) == "w4a4e4u4"


def test_hardware_study(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sc.BITS, "small", (32, 8))
    monkeypatch.setitem(sc.DEVICES, "small", ("ideal", "poor"))
    monkeypatch.setitem(sc.READ_NOISE, "small", (0.05,))
    monkeypatch.setitem(sc.HARDWARE_DATASETS, "small", sc.DATASETS)
    seen = spy_runs(monkeypatch, lambda base, rules, out, configs: (base.dataset, base.quant, base.rounding,
                                                                     base.analog, rules))
    docs = tmp_path / "docs"
    text = rep.reproduce(["hardware"], "small", tmp_path / "runs", docs).read_text()
    assert ("mnist", "w8a8e8u8", "stochastic", "", ("bp", "ftp", "dfa", "pepita")) in seen
    assert ("fashion-mnist", "", "stochastic", "ideal:read_noise=0.05", ("bp", "ftp", "dfa", "pepita")) in seen
    assert len(seen) == 2 * (2 + 2 + 1)
    assert not [call for call in seen if call[3] == "ideal"]  # the ideal device reads the float runs
    assert len(list((tmp_path / "runs" / "small").glob("hardware-mnist-*"))) == 4  # float, b8, poor, readnoise0.05
    for fig in ("hardware-bits", "hardware-analog"):
        assert (docs / "results" / f"{fig}.small.png").stat().st_size > 10_000 and f"results/{fig}.small.png" in text
    assert "### mnist: accuracy against bits" in text and "### fashion-mnist: accuracy against analog" in text
    assert "| float (32 bits) |" in text and "| 8 bits |" in text and "| poor |" in text and "| read noise 0.05 |" in text
    assert text.count("| bits | bp | ftp | dfa | pepita |") == 2
    assert "FTP's mean test accuracy is higher than BP's in" in text and "of 10 settings" in text
    assert "FTP loses less accuracy than BP in" in text and "of 6 settings" in text
    assert "within 0.5 points of float FTP on the MNIST MLP\": holds" in text or "\": does not hold" in text
    summary = json.loads((docs / "results" / "hardware.small.summary.json").read_text())
    assert summary[0][0].startswith("MNIST MLP, FTP w8a8e8u8") and len(summary) == 3


def test_hardware_verdict_without_8_bits(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sc.HARDWARE_DATASETS, "small", ("mnist",))
    monkeypatch.setattr(sc, "RULES", ["bp", "ftp"])
    monkeypatch.setitem(sc.BITS, "small", (4,))
    monkeypatch.setitem(sc.DEVICES, "small", ("ideal",))
    monkeypatch.setitem(sc.READ_NOISE, "small", ())
    body, summary = sc.study_hardware(rep.BUDGETS["small"], tmp_path / "runs", tmp_path)
    assert "not measured in this budget" in body and "of 2 settings" in body and len(summary) == 1


def test_hardware_headline_runs_at_the_budget_epochs_when_the_grid_is_shorter(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sc.HARDWARE_DATASETS, "small", ("mnist",))
    monkeypatch.setattr(sc, "RULES", ["bp", "ftp"])
    monkeypatch.setitem(sc.BITS, "small", (32, 8))
    monkeypatch.setitem(sc.DEVICES, "small", ("ideal",))
    monkeypatch.setitem(sc.READ_NOISE, "small", ())
    monkeypatch.setitem(rep.BUDGETS, "small", rep.Budget("small", epochs=2, seeds=1, bench_rounds=1))
    monkeypatch.setitem(sc.HARDWARE_EPOCHS, "small", 1)
    seen = spy_runs(monkeypatch, lambda base, rules, out, configs: (base.epochs, base.quant, rules, out.name))
    budget = rep.BUDGETS["small"]
    body, summary = sc.study_hardware(budget, tmp_path / "runs", tmp_path)
    assert (1, "", ("bp", "ftp"), "hardware-mnist-float") in seen and (1, "w8a8e8u8", ("bp", "ftp"), "hardware-mnist-b8") in seen
    assert (budget.epochs, "", ("ftp",), "hardware-headline-mnist-float") in seen
    assert (budget.epochs, "w8a8e8u8", ("ftp",), "hardware-headline-mnist-b8") in seen
    assert "MLP 784-1024-128-10 relu, 1 epochs" in body and f"points; {budget.epochs} epochs, seeds 0..0)" in body
    assert summary[0][0].startswith("MNIST MLP, FTP w8a8e8u8")


def test_cells_count_diverged_and_collapsed_runs():
    e = lambda *acc, div=0: {"acc": list(acc), "diverged": div, "runs": len(acc) + div}  # noqa: E731
    assert sc._cell(e(90.0, 92.0)) == "91.00 ± 1.41"
    assert sc._cell(e(div=3)) == "diverged (3/3)"
    assert sc._cell(e(11.35, 11.35, 90.0, div=1)) == "37.57 ± 45.41 (1/4 diverged, 2/4 at chance)"


def test_ftp_vs_bp_is_computed():
    e = lambda *acc, div=0: {"acc": list(acc), "diverged": div, "runs": len(acc) + div}  # noqa: E731
    text = sc._ftp_vs_bp({"a": {"bp": e(90.0), "ftp": e(91.0)}, "b": {"bp": e(92.0), "ftp": e(91.5)},
                          "c": {"bp": e(div=1), "ftp": e(80.0)}})
    assert "higher than BP's in 2 of 3 settings: a (+1.00), c (BP diverged)" in text and "not higher in b (-0.50)" in text


def test_depth_study(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sc.MLP_DEPTHS, "small", (1, 3))
    monkeypatch.setitem(sc.CNN_DEPTHS, "small", (4,))
    seen = spy_runs(monkeypatch, lambda base, rules, out, configs: (
        base.dataset, base.model, base.hidden, base.depth, base.activation, base.init, base.norm, rules,
        tuple(sorted(configs["ftp"]["rule"].items())), out.name))
    docs = tmp_path / "docs"
    text = rep.reproduce(["depth"], "small", tmp_path / "runs", docs).read_text()
    four = ("bp", "ftp", "dfa", "pepita")
    deep = ftprop.compare.load_rule_config(ftprop.compare.CONFIGS / "ftp-deep.toml")["rule"]
    assert deep["deep_weight"] < 1  # the deeper blocks' local losses are weighted down (configs/ftp-deep.toml)
    mlp_ftp = tuple(sorted(deep.items()))
    conv_ftp = tuple(sorted(ftprop.compare.load_rule_config(ftprop.compare.CONFIGS / "ftp-conv.toml")["rule"].items()))
    assert ("mnist", "mlp", "256,256,256", None, "tanh", "auto", "none", four, mlp_ftp, "depth-mnist-mlp3") in seen
    assert ("fashion-mnist", "resnet", "1024,128", 4, "relu", "torch", "none", four, conv_ftp, "depth-fashion-mnist-cnn4") in seen
    assert ("mnist", "mlp", "256,256,256", None, "relu", "auto", "none", four, mlp_ftp, "depth-relu-mnist-mlp3") in seen
    assert ("mnist", "mlp", "256,256,256", None, "relu", "auto", "layernorm", ("bp", "ftp"),
            tuple(sorted(sc.RELU_LN_FTP.items())),
            "depth-reluln-mnist-mlp3") in seen
    adam = {r: ftprop.compare.load_rule_config(ftprop.compare.CONFIGS / f) for r, f in sc.ADAM_CONFIGS.items()}
    assert adam["bp"]["optimizer"] == adam["ftp"]["optimizer"] == "adam" and "rule" not in adam["bp"]
    assert ("mnist", "mlp", "256,256,256", None, "tanh", "auto", "none", ("bp", "ftp"),
            tuple(sorted(adam["ftp"]["rule"].items())), "depth-headline-mnist-mlp3-adam") in seen
    every = ftprop.compare.load_rule_config(ftprop.compare.CONFIGS / sc.EVERY_CONFIG)
    assert every["optimizer"] == "adam" and every["rule"]["inject"] == "every"
    assert ("mnist", "mlp", "256,256,256", None, "tanh", "auto", "none", ("ftp",),
            tuple(sorted(every["rule"].items())), "depth-headline-mnist-mlp3-adam-every") in seen
    for n in (1, 3):  # the variant at every depth of the MNIST MLP grid, at the grid's epochs
        assert ("mnist", "mlp", ",".join(["256"] * n), None, "tanh", "auto", "none", ("ftp",),
                tuple(sorted(every["rule"].items())), f"depth-mnist-mlp{n}-adam-every") in seen
    assert len(seen) == 2 * 2 + 2 + 2 + 2 + 2  # no separate SGD headline run: the grid trains the budget's epochs
    assert (docs / "results" / "depth.small.png").stat().st_size > 10_000 and "results/depth.small.png" in text
    assert "| MLP 3 hidden |" in text and "| CNN 4 conv |" in text and "| depth | bp | ftp | dfa | pepita |" in text
    assert "Divergence per depth" in text and "| mnist | MLP 1 hidden | 0/1 | 0/1 |" in text
    assert "| ReLU + LayerNorm, 3 hidden |" in text and "| not run | not run |" in text
    assert "MNIST, 3 hidden layers of 256, 1 epochs, seeds 0..0, each rule with two optimisers" in text
    assert "| rule | SGD | Adam | judged at |" in text
    for rule in ("bp", "ftp"):  # judged at the optimiser with the higher validation accuracy, whatever the test says
        val = {opt: json.loads((tmp_path / "runs" / "small" / run / f"{rule}-seed0" / "metrics.json").read_text())[
            "best_val_accuracy"] for opt, run in (("SGD", "depth-mnist-mlp3"), ("Adam", "depth-headline-mnist-mlp3-adam"))}
        row = next(line for line in text.splitlines() if line.startswith(f"| {rule.upper()} |"))
        assert row.endswith(f"| {max(val, key=val.get)} |") and f"(validation {100 * val['Adam']:.2f})" in row
    assert "FTP diverged runs at any MLP depth: 0; goal met" in text or "; goal not met" in text
    every_run = json.loads((tmp_path / "runs" / "small" / "depth-headline-mnist-mlp3-adam-every" / "ftp-seed0"
                            / "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith('| FTP, inject="every" |'))
    assert row == (f'| FTP, inject="every" | - | {100 * every_run["test_accuracy"]:.2f} (1 run) (validation '
                   f'{100 * every_run["best_val_accuracy"]:.2f}) | Adam |')
    assert 'FTP with inject="every" (Adam)' in text and ": diverged runs at any MLP depth: 0; goal " in text
    assert '| depth | ftp (grid) | ftp, inject="every" |' in text
    assert len([line for line in text.splitlines() if line.startswith("| MLP 3 hidden |") and line.count("|") == 4]) == 1
    summary = json.loads((docs / "results" / "depth.small.summary.json").read_text())
    assert summary[0][0] == "MNIST MLP 3 x 256, FTP vs BP (1 epochs)"
    assert summary[1][0] == 'MNIST MLP 3 x 256, FTP inject="every" vs BP (1 epochs)'
    assert summary[2][0] == "Fashion-MNIST CNN 4 conv (1 epochs), FTP − BP"


def test_depth_headline_runs_at_the_budget_epochs_when_the_grid_is_shorter(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sc.MLP_DEPTHS, "small", (2,))
    monkeypatch.setitem(sc.CNN_DEPTHS, "small", (2,))
    monkeypatch.setattr(sc, "RULES", ["bp", "ftp"])
    monkeypatch.setattr(sc, "DATASETS", ("mnist", "fashion-mnist"))
    monkeypatch.setitem(rep.BUDGETS, "small", rep.Budget("small", epochs=2, seeds=1, bench_rounds=1))
    monkeypatch.setitem(sc.DEPTH_EPOCHS, "small", {"mlp": 1, "cnn": 1})
    seen = spy_runs(monkeypatch, lambda base, rules, out, configs: (base.epochs, base.activation, rules, out.name))
    body, summary = sc.study_depth(rep.BUDGETS["small"], tmp_path / "runs", tmp_path)
    assert (1, "tanh", ("bp", "ftp"), "depth-mnist-mlp2") in seen and (1, "relu", ("bp", "ftp"), "depth-mnist-cnn2") in seen
    assert (2, "tanh", ("bp", "ftp"), "depth-headline-mnist-mlp2") in seen
    assert (2, "tanh", ("bp", "ftp"), "depth-headline-mnist-mlp2-adam") in seen
    assert (2, "tanh", ("ftp",), "depth-headline-mnist-mlp2-adam-every") in seen
    assert (1, "tanh", ("ftp",), "depth-mnist-mlp2-adam-every") in seen and len(seen) == 4 + 2 + 1 + 1 + 1 + 1
    assert "MLPs: N hidden layers of 256 (`--hidden 256,...`), tanh, Xavier init (`--init auto`), 1 epochs" in body
    assert "MNIST, 2 hidden layers of 256, 2 epochs, seeds 0..0, each rule with two optimisers" in body
    assert summary[0][0] == "MNIST MLP 2 x 256, FTP vs BP (2 epochs)"


def test_cnn_study(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(sc, "BENCH_BATCHES", (16,))
    monkeypatch.setattr(sc, "BENCH_STEPS", 2)
    seen = spy_runs(monkeypatch, lambda base, rules, out, configs: (base.dataset, base.model, base.depth,
                                                                     base.activation, rules,
                                                                     configs["ftp"]["rule"]))
    timed = []  # the FTP rule options each model's step time is measured with
    real_benchmark = sc.benchmark
    repeats = []  # each timing is repeated with fresh models (bench.benchmark), its rounds shared out among repeats
    monkeypatch.setattr(sc, "benchmark", lambda rules, *a, **k: timed.append(rules["ftp"].options())
                        or repeats.append((k["repeats"], k["rounds"])) or real_benchmark(rules, *a, **k))
    docs = tmp_path / "docs"
    text = rep.reproduce(["cnn"], "small", tmp_path / "runs", docs).read_text()
    for options, (*_, config) in zip(timed, sc.BENCH_MODELS, strict=True):  # the options that model trains with
        rule = ftprop.compare.load_rule_config(ftprop.compare.CONFIGS / config)["rule"]
        assert {k: options[k] for k in rule} == rule
    conv, paper, conv_open, stem = (ftprop.compare.load_rule_config(ftprop.compare.CONFIGS / f)["rule"]
                                    for f in ("ftp-conv.toml", "ftp-paper-cnn.toml", "ftp-conv-open.toml",
                                              "ftp-paper-stem.toml"))
    assert paper["g_scale"] != conv["g_scale"]  # the paper CNN has its own G scale; residual nets keep ftp-conv.toml's
    # the open residual CNN: ftp-conv.toml with the deeper blocks' losses weighted down and a larger G
    assert conv_open == conv | {"deep_weight": 0.3, "g_scale": 0.05}
    # the residual blocks on the paper CNN's stem: the paper CNN's config with inner targets, the blocks weighted down
    assert stem == paper | {"inner_targets": True, "deep_weight": 0.1}
    both = ("bp", "ftp")
    assert seen == [("mnist", "paper-cnn", None, "relu", both, paper),
                    ("fashion-mnist", "paper-cnn", None, "relu", both, paper),
                    ("fashion-mnist", "paper-cnn", None, "relu", both, paper),  # trained longer: its own row
                    ("fashion-mnist", "resnet", sc.RESNET_DEPTH, "relu", both, conv),
                    ("fashion-mnist", "spec", None, "tanh", both, conv_open),  # the residual CNN without its head pool
                    ("fashion-mnist", "spec", None, "relu", both, stem)]  # residual blocks on the paper CNN's stem
    open_config = json.loads((tmp_path / "runs" / "small" / f"cnn-fashion-mnist-resnet{sc.RESNET_DEPTH}-open" /
                              "ftp-seed0" / "config.json").read_text())
    assert open_config["spec"] == "c16p1-tanh-c32s2p1-tanh-r32-r32-f-l10" and open_config["activation"] == "tanh"
    assert f"| resnet depth {sc.RESNET_DEPTH}, tanh, no head pool, fashion-mnist |" in text
    assert "`--model spec --spec c16p1-tanh-c32s2p1-tanh-r32-r32-f-l10 --activation tanh`" in text
    assert "configs/ftp-paper-cnn.toml on the paper CNN (where G is also equal over each 2x2 pool window" in text
    assert "and configs/ftp-conv.toml on the residual CNN" in text
    assert "on the second residual CNN configs/ftp-conv-open.toml" in text and "`ftp=configs/ftp-conv-open.toml`" in text
    assert "| paper CNN, mnist |" in text and f"| resnet depth {sc.RESNET_DEPTH}, fashion-mnist |" in text
    assert "| paper CNN | 16 | ftp |" in text and "| residual CNN depth 6 | 16 | bp |" in text
    assert "paper CNN: FTP's MACs per sample are " in text and "residual CNN depth 6: FTP's MACs per sample are " in text
    assert "| paper CNN stem + 3 residual blocks | 16 | ftp |" in text  # the residual net on the paper CNN's stem
    assert text.count("so the goal (") == 3 and "lies above that floor." in text  # the paper CNN's 1.34
    assert (f"`--model spec --spec {sc.STEM_RESNET_SPEC} --config configs/ftp-paper-stem.toml`" in text
            and "`--model resnet --depth 6 --config configs/ftp-conv.toml`" in text)  # each timed model's command
    small = rep.BUDGETS["small"]
    assert set(repeats) == {(small.bench_repeats, small.rounds_per_repeat)} and small.bench_repeats > 1
    assert f"{small.bench_repeats} repeats, each with fresh models" in text and f"--repeats {small.bench_repeats}`" in text
    ftp_row = next(line for line in text.splitlines() if line.startswith("| paper CNN | 16 | ftp |"))
    assert re.search(r"\| \d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\) \|", ftp_row)  # time / BP with its range over repeats
    summary = json.loads((docs / "results" / "cnn.small.summary.json").read_text())
    assert [r[2] for r in summary] == ["within 1.0 point(s)"] * 3 + ["within 2.0 point(s)"] * 3 + ["<= 1.34"] + ["<= 1.15"] * 2
    long = sc.CNN_LONG_EPOCHS["small"]
    assert long != sc.CNN_EPOCHS["small"] and summary[2][0] == f"paper CNN, fashion-mnist, {long} epochs, FTP − BP"
    assert f"| paper CNN, fashion-mnist, {long} epochs |" in text
    for rule in ("bp", "ftp"):  # both rules of that row trained for its epochs
        config = tmp_path / "runs" / "small" / f"cnn-fashion-mnist-paper-{long}ep" / f"{rule}-seed0" / "config.json"
        assert json.loads(config.read_text())["epochs"] == long
    stem_config = json.loads((tmp_path / "runs" / "small" / f"cnn-fashion-mnist-pstem-{long}ep" / "ftp-seed0" /
                              "config.json").read_text())
    assert stem_config["spec"] == sc.STEM_RESNET_SPEC and stem_config["epochs"] == long
    assert stem_config["rule_options"] == stem and stem_config["activation"] == "relu"
    assert f"| paper CNN stem + 3 residual blocks, fashion-mnist, {long} epochs |" in text
    assert f"`--model spec --spec {sc.STEM_RESNET_SPEC} --epochs {long} --rule-config ftp=configs/ftp-paper-stem.toml`" in text


def test_robustness_is_computed():
    e = lambda *acc: {"acc": list(acc), "diverged": 0, "runs": len(acc)}  # noqa: E731
    text = sc._robustness({"m 8 bits": ({"ftp": e(90.0), "bp": e(95.0)}, {"ftp": e(89.5), "bp": e(93.0)}),
                           "m poor": ({"ftp": e(90.0), "bp": e(95.0)}, {"ftp": e(80.0), "bp": e(90.0)})})
    assert "less accuracy than BP in 1 of 2 settings: m 8 bits (FTP loses 0.50, BP 2.00)" in text
    assert "as much or more in m poor (FTP loses 10.00, BP 5.00)" in text
    collapsed = sc._robustness({"m 4 bits": ({"ftp": e(90.0), "bp": e(95.0)}, {"ftp": e(10.0), "bp": e(11.35)}),
                                "m 8 bits": ({"ftp": e(90.0), "bp": e(95.0)}, {"ftp": e(89.5), "bp": e(93.0)})})
    assert "in 1 of 1 settings: m 8 bits" in collapsed and "Both end at chance level or diverge in m 4 bits." in collapsed
