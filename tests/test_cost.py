"""Analytic MAC counts against torch's FLOP counter running each rule's real step; the published table; the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ftprop.bench import FlopCount
from ftprop.cli import main
from ftprop.cost import MCUS, PUBLISHED_FC_MNIST, cost_for, model_cost, trace
from ftprop.models import Block, Net, build_model, mlp
from ftprop.rules import RULES, make_rule

BATCH = 3


def counted_macs_per_sample(model: Net, rule, x: torch.Tensor, y: torch.Tensor) -> float:
    """The MACs of the rule's real step, as `ftprop bench` counts them (no module hooks, so FTP runs its fast path)."""
    rule.step(model, x, y)  # first step creates the rule's matrices outside the count, like any later step
    with FlopCount() as counter:
        rule.step(model, x, y)
    return counter.flops / 2 / x.shape[0]


def check(model: Net, input_shape, rules: dict, n_classes: int, counter_excess: int = 0) -> None:
    """`counter_excess`: MACs per sample the counter adds on top of the true count (see the conv test)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *input_shape, generator=gen)
    y = torch.randint(0, n_classes, (BATCH,), generator=gen)
    analytic = model_cost(model, input_shape, rules)
    for name, rule in rules.items():
        counted = counted_macs_per_sample(model, rule, x, y)
        assert analytic[name]["macs_per_sample"] + counter_excess == counted, \
            (name, analytic[name]["macs_per_sample"], counted)
        assert sum(layer["macs"] for layer in analytic[name]["layers"]) == analytic[name]["macs_per_sample"]


def all_rules(**overrides) -> dict:
    return {name: make_rule(name, **overrides.get(name, {})) for name in RULES}


def test_every_rule_matches_the_flop_counter_on_the_paper_mlp():
    torch.manual_seed(0)
    check(mlp(784, (1024, 128), 10), (1, 28, 28), all_rules(), 10)


def test_every_rule_and_option_matches_on_a_small_deeper_net():
    torch.manual_seed(0)
    net = mlp(20, (16, 12, 8), 5, activation="relu", norm="layernorm")
    rules = all_rules()
    rules |= {"ftp-tanh": make_rule("ftp", target_nonlin="tanh"), "ftp-t": make_rule("ftp", update_input="t"),
              "ftp-nofprime-t": make_rule("ftp", fprime=False, update_input="t"),
              "ff-predict": make_rule("ff", logits="predict"),
              "dtp-linear": make_rule("dtp", inverse_activation="linear")}
    check_named(net, (20,), rules, 5)


def check_named(model, input_shape, rules, n_classes):
    """Like check, for rules keyed by a label: the cost model is chosen by the rule object's name."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *input_shape, generator=gen)
    y = torch.randint(0, n_classes, (BATCH,), generator=gen)
    from ftprop.cost import rule_cost
    blocks = trace(model, input_shape)
    for label, rule in rules.items():
        expected = rule_cost(rule.name, blocks, rule)["macs_per_sample"]
        assert expected == counted_macs_per_sample(model, rule, x, y), label


class _Residual(nn.Module):
    """conv-relu-conv plus a strided 1x1 shortcut: modules inside the block need input grads even locally."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, groups=2)
        self.short = nn.Conv2d(c_in, c_out, 1, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))) + self.short(x)


def test_conv_blocks_match_the_flop_counter():
    """Conv formula C_out*H_out*W_out*C_in*k*k/groups, and a residual unit, for the rules that take conv blocks.

    torch's counter (2.13) counts the weight grad of a grouped convolution as if it were not grouped (groups times
    the forward's MACs; measured: 1x, 2x, 3x, 6x for groups 1, 2, 3, 6). The true count is the forward's, as for
    any convolution; the excess is added to the analytic figure for the comparison: each of these rules computes
    that weight grad once per step.
    """
    torch.manual_seed(0)
    net = Net([Block(nn.Conv2d(1, 4, 5, padding=2), nn.Tanh()),
               Block(_Residual(4, 6), nn.ReLU()),
               Block(nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 3)))])
    rules = {name: make_rule(name) for name in ("bp", "ftp", "dfa", "drtp", "pepita")}
    grouped = 6 * 4 * 4 * (6 // 2) * 9  # conv2: groups 2
    check(net, (1, 8, 8), rules, 3, counter_excess=(2 - 1) * grouped)
    blocks = trace(net, (1, 8, 8))
    assert blocks[0].forward == 4 * 8 * 8 * 1 * 25
    assert [m.internal for m in blocks[1].modules] == [False, True, False]  # conv1, conv2, shortcut
    assert blocks[1].modules[1].forward == 6 * 4 * 4 * (6 // 2) * 9


FTP_PATH_CASES = [  # (spec, activation, FTP options): each a part of FTP's step that changes its MACs
    ("c4k3-relu-p2-r4-r4-f-l3", "relu", dict()),
    ("c4k3-relu-p2-r4-r4-f-l3", "relu", dict(inner_targets=True)),  # no input grad through a branch's second conv
    ("c4k3-relu-p2-r4-r4-f-l3", "relu", dict(g_block=2, compare_at="next-input")),  # G onto the pooled grid; rank K
    ("c4k3-relu-p2-r4-r4-f-l3", "relu", dict(g_block=2, compare_at="next-input", inner_targets=True, deep_weight=0.1)),
    ("c4k3-relu-p2-r4-r4-f-l3", "relu", dict(g_block=2, compare_at="next-input", target_nonlin="tanh")),  # no rank K
    ("c4k3-relu-r4-r4-f-l3", "relu", dict(inject="every")),  # a projection per hidden block; rank K (no pool)
    ("c4k3-relu-r4-r4-f-l3", "relu", dict(inject="every", target_nonlin="tanh", update_input="t")),  # two each
    ("f-l16-relu-l12-relu-l8-relu-l3", "relu", dict(update_input="t")),  # closed form: no layer run again
    ("f-l16-relu-l12-relu-l8-relu-l3", "relu", dict(update_input="t", inject="every")),
]


@pytest.mark.parametrize("batch", [2, 12])
@pytest.mark.parametrize("spec, activation, options", FTP_PATH_CASES)
def test_ftp_count_follows_the_step_it_runs(spec, activation, options, batch):
    """FTP's analytic count (`FTP.step_path`) equals the ops its real step runs, with each option that changes them,
    at a batch where block 2's first op at rank K does fewer MACs than on the batch (12 > K = 3) and one where it
    would do more (2), where the step runs it as usual."""
    torch.manual_seed(0)
    net = build_model("spec", (1, 8, 8), 3, activation=activation, spec=spec)
    rule = make_rule("ftp", **options)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    counted = counted_macs_per_sample(net, rule, x, y)
    r = model_cost(net, (1, 8, 8), {"ftp": rule}, batch_size=batch)["ftp"]
    assert r["macs_per_sample"] == pytest.approx(counted, abs=0.5), (r["layers"], counted)  # rank K: rounded to a MAC
    rank_k = rule.step_path(net).rank_k_op is not None and batch == 12
    assert ("second_pass_rank_k" in r["layers"][1]) == rank_k


def test_ftp_count_of_the_stem_residual_net():
    """The stem residual net with configs/ftp-paper-stem.toml's options at batch 64 (the bench row's setting): per
    sample, BP's count less the six convs' input grads BP makes and FTP does not (three crossing into a block, three
    inside a branch, which inner targets cut), plus the second pass's six convs, one of them at rank K (10 of G's
    rows per 64 samples and the 64 x 10 x |out| product), plus the projection onto the pooled map."""
    torch.manual_seed(0)
    spec = "c32k5-relu-p2-r32z-r32z-r32z-f-l10"
    net = build_model("spec", (1, 28, 28), 10, activation="relu", spec=spec)
    ftp = make_rule("ftp", g_scale=0.01, g_block=2, compare_at="next-input", inner_targets=True, deep_weight=0.1)
    r = model_cost(net, (1, 28, 28), {"bp": make_rule("bp"), "ftp": ftp}, batch_size=64)
    conv = 32 * 12 * 12 * 32 * 9  # one 3x3 conv of a block, per sample
    assert r["ftp"]["macs_per_sample"] == (r["bp"]["macs_per_sample"] - 6 * conv - 10 * 32 * 12 * 12  # the head's
                                           + 5 * conv + round(10 * conv / 64) + 10 * 32 * 12 * 12  # input grad
                                           + 10 * 32 * 12 * 12)
    assert r["ftp"]["macs_per_sample"] / r["bp"]["macs_per_sample"] == pytest.approx(0.957, abs=0.001)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    assert counted_macs_per_sample(net, ftp, x, y) == pytest.approx(r["ftp"]["macs_per_sample"], abs=0.5)


def test_flop_count_installs_no_hook_and_counts_as_torch_does():
    """`FlopCount` (ftprop bench's counter) counts what torch's FlopCounterMode counts, op for op, on BP; under
    FlopCounterMode's global module hooks FTP stands its rewrites down and does block 2's first op on the batch."""
    torch.manual_seed(0)
    net = build_model("spec", (1, 8, 8), 3, activation="relu", spec="c4k3-relu-p2-r4-r4-f-l3")
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    for rule, same in ((make_rule("bp"), True), (make_rule("ftp", g_block=2, compare_at="next-input"), False)):
        rule.step(net, x, y)
        with FlopCounterMode(display=False) as torch_count:
            rule.step(net, x, y)
        with FlopCount() as ours:
            assert not torch.nn.modules.module._global_forward_hooks
            rule.step(net, x, y)
        assert (ours.flops == torch_count.get_total_flops()) == same
        assert ours.flops <= torch_count.get_total_flops()


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU])
@pytest.mark.parametrize("layers", [1, 2])
def test_recurrent_formula_matches_the_flop_counter(cls, layers):
    """Forward T*g*H*(I+H) per layer; local backward adds weight grads, (T-1)*g*H*H through the recurrence and the
    upper layers' input grads. (LSTM on CPU runs a fused kernel the counter cannot see: it counts 0.)"""
    from ftprop.cost import _module_cost
    m = cls(5, 7, num_layers=layers, batch_first=True)
    x = torch.randn(1, 6, 5)
    with FlopCounterMode(display=False) as fwd:
        out, _ = m(x)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    cost = _module_cost("rnn", m, x, out)
    assert cost.forward == fwd.get_total_flops() // 2
    assert cost.weight_grad + cost.recurrence_grad == bwd.get_total_flops() // 2
    x.requires_grad_(True)
    out, _ = m(x)
    with FlopCounterMode(display=False) as bwd2:
        out.sum().backward()
    assert cost.weight_grad + cost.recurrence_grad + cost.input_grad == bwd2.get_total_flops() // 2


def test_published_fc_mnist_figures():
    """Within 2% of the authors' spreadsheet, except DTP whose difference is explained in ftprop/cost.py."""
    r = cost_for("mnist", ["bp", "ftp", "pepita", "dtp", "ff"])
    macs = {k: v["macs_per_sample"] for k, v in r.items()}
    assert macs == {"bp": 2_002_688, "ftp": 2_011_648, "pepita": 2_813_344, "dtp": 2_526_976, "ff": 3_735_552}
    for name in ("bp", "ftp", "pepita", "ff"):
        assert abs(macs[name] / PUBLISHED_FC_MNIST[name] - 1) < 0.02, name
    tanh = cost_for("mnist", {"ftp": make_rule("ftp", target_nonlin="tanh")})["ftp"]["macs_per_sample"]
    assert abs(tanh / PUBLISHED_FC_MNIST["ftp"] - 1) < 0.001
    assert PUBLISHED_FC_MNIST["dtp"] - (macs["bp"] + 935_168) < 500  # published DTP = BP + one forward-sized pass


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "cifar100"])
def test_the_explanations_of_the_published_differences(dataset):
    """Published FTP = BP + 2 n_out |h_1| (ours lacks the output layer's input grad, n_out x 128); published
    DTP = BP + one forward; published FF ~ 4 forwards through all layers (ours skips the output layer)."""
    from ftprop.cost import PUBLISHED_FC
    pub = PUBLISHED_FC[dataset]
    r = cost_for(dataset, {"bp": make_rule("bp"), "ftp": make_rule("ftp", target_nonlin="tanh"),
                           "pepita": make_rule("pepita"), "ff": make_rule("ff")})
    bp, n_out = r["bp"]["macs_per_sample"], r["bp"]["layers"][-1]["out"]
    forward = sum(layer["forward"] for layer in r["bp"]["layers"])
    assert abs(bp - pub["bp"]) < 500 and abs(r["pepita"]["macs_per_sample"] - pub["pepita"]) < 500
    assert abs(bp + 2 * n_out * 1024 - pub["ftp"]) < 500
    assert r["ftp"]["macs_per_sample"] == bp + 2 * n_out * 1024 - n_out * 128
    assert abs(bp + forward - pub["dtp"]) < 500
    assert abs(4 * forward / pub["ff"] - 1) < 0.0015
    assert r["ff"]["macs_per_sample"] == 4 * (forward - n_out * 128)


def test_memory_and_latency():
    r = cost_for("mnist", ["bp", "ftp", "drtp", "ff", "pepita"], batch_size=64, bytes_per_value=4)
    acts = 784 + 1024 + 128  # h_0 .. h_{L-1}
    assert r["bp"]["bytes_kept_between_passes"] == acts * 64 * 4
    assert r["ftp"]["bytes_kept_between_passes"] == acts * 64 * 4
    assert r["pepita"]["bytes_kept_between_passes"] == acts * 64 * 4
    assert r["drtp"]["bytes_kept_between_passes"] == 128 * 64 * 4
    assert r["ff"]["bytes_kept_between_passes"] == 0
    assert r["ftp"]["bytes_rule_state"] == 10 * 1024 * 4
    m7 = MCUS["cortex-m7"]
    assert r["bp"]["latency_s"]["cortex-m7"] == pytest.approx(2_002_688 * 3 / 550e6)
    assert r["bp"]["latency_s"]["cortex-m4"] == pytest.approx(2_002_688 * 4.5 / 170e6)
    assert m7.clock_hz == 550e6
    ln = cost_for("mnist", ["bp"], norm="layernorm")["bp"]
    assert ln["values_kept_per_sample"] == acts + 1024 + 128  # LayerNorm's derivative needs a_l too


def test_cli_cost_json_and_table(capsys):
    assert main(["cost", "--rules", "bp,ftp,dfa", "--dataset", "mnist", "--hidden", "1024,128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"bp", "ftp", "dfa"}
    assert out["bp"]["macs_per_sample"] == 2_002_688
    assert set(out["ftp"]["latency_s"]) == {"cortex-m7", "cortex-m4"}
    assert "bytes_kept_between_passes" in out["ftp"] and len(out["ftp"]["layers"]) == 3
    assert main(["cost", "--rules", "bp,ftp", "--dataset", "mnist", "--hidden", "1024,128"]) == 0
    text = capsys.readouterr().out
    assert "| bp | 2,002,688 |" in text and "2.003M" in text
    assert main(["cost", "--rules", "bp,ftp", "--dataset", "mnist", "--batch-size", "64"]) == 0
    text = capsys.readouterr().out  # FTP at rank K: 1,902,336, not comparable with the published 2.023M
    assert "| ftp | 1,902,336 |" in text and "published" not in text
    assert main(["cost", "--rules", "bp,nope", "--dataset", "mnist"]) == 2
    assert "unknown rule" in capsys.readouterr().err


def test_cli_cost_of_a_spec_model_with_a_training_config(capsys):
    """`--spec` and `--depth` name the conv models, `--config` takes the FTP options a study trained with (the stem
    net's: projection onto the pooled map, inner targets), and `--batch-size` the batch of the rank-K op."""
    spec = ["--model", "spec", "--spec", "c32k5-relu-p2-r32z-r32z-r32z-f-l10", "--activation", "relu"]
    assert main(["cost", "--rules", "bp,ftp", *spec, "--config", "configs/ftp-paper-stem.toml", "--batch-size", "64",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["bp"]["macs_per_sample"], out["ftp"]["macs_per_sample"]) == (24_947_712, 23_874_048)
    assert main(["cost", "--rules", "ftp", *spec, "--json"]) == 0  # FTP's defaults: its definition's count
    assert json.loads(capsys.readouterr().out)["ftp"]["macs_per_sample"] == 29_067_264
    assert main(["cost", "--rules", "bp", "--model", "resnet", "--depth", "4", "--activation", "relu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["bp"]["layers"]) == 4  # conv, conv, one residual block, dense
    assert main(["cost", "--rules", "ftp", *spec, "--config", "no/such.toml"]) == 2
    assert "no/such.toml" in capsys.readouterr().err


@pytest.mark.parametrize("dataset,published_bp,published_ftp", [("mnist", 1.097e6, 1.465e6),
                                                                 ("cifar10", 4.002e6, 4.503e6)])
def test_the_paper_cnn_against_the_spreadsheet(dataset, published_bp, published_ftp):
    """conv5x5x32-pool2-dense: the published figures are ours + 2 x the conv output size (elementwise activation and
    pooling work), and for FTP also + the dense layer's input grad that FTP never computes."""
    from ftprop.cost import DATASET_SHAPES
    (c, h, w), classes = DATASET_SHAPES[dataset]
    net = Net([Block(nn.Conv2d(c, 32, 5), nn.ReLU()),
               Block(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * ((h - 4) // 2) ** 2, classes)))])
    r = model_cost(net, (c, h, w), {"bp": make_rule("bp"), "ftp": make_rule("ftp", target_nonlin="tanh")})
    conv_out = 32 * (h - 4) * (w - 4)
    dense_input_grad = r["bp"]["layers"][1]["input_grad"]
    assert r["ftp"]["layers"][0]["projection"] == 2 * classes * conv_out
    assert abs(r["bp"]["macs_per_sample"] + 2 * conv_out - published_bp) < 500
    assert abs(r["ftp"]["macs_per_sample"] + 2 * conv_out + dense_input_grad - published_ftp) < 500


def _refused_by_the_step(net: Net, rule, input_shape) -> str:
    with pytest.raises(ValueError) as err:
        rule.step(net, torch.randn(4, *input_shape), torch.randint(0, 3, (4,)))
    return str(err.value)


@pytest.mark.parametrize("rule_name, options, model", [
    ("dtp", {}, "f-l16-bn-tanh-l3"),        # an MLP with batch norm: not a plain MLP
    ("ff", {}, "f-l16-tanh-d0.1-l3"),       # dropout
    ("ff", {}, "f-l16-ln-tanh-l3"),         # affine LayerNorm
    ("ftp", {"g_block": 2}, "f-l16-tanh-l8-tanh-l3"),  # G's patches on a flat first output
    ("ftp", {"g_block": 3}, "c4k3-relu-p2-f-l3"),      # 6 x 6 map, patches of 3 fit; 4 do not: below
    ("fa", {}, "transpose"),                # a ConvTranspose2d FA has no feedback matrix for
])
def test_cost_refuses_a_model_the_step_refuses(rule_name, options, model):
    """`ftprop cost` used to give a figure for steps that cannot run (DTP and FF on MLPs with norms or dropout, FTP's
    g_block on a map it cannot tile, FA on a layer without a feedback matrix): it now refuses in the step's words."""
    torch.manual_seed(0)
    if model == "transpose":
        net = Net([Block(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU()), Block(nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ReLU()),
                   Block(nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))])
    else:
        net = build_model("spec", (1, 8, 8), 3, spec=model)
    if options.get("g_block") == 3:  # the first block's output is 4 x 6 x 6: g_block 3 runs, 4 is refused
        assert model_cost(net, (1, 8, 8), {"ftp": make_rule("ftp", g_block=3)})["ftp"]["macs_per_sample"] > 0
        options = {"g_block": 4}
    rule = make_rule(rule_name, **options)
    message = _refused_by_the_step(net, rule, (1, 8, 8))
    with pytest.raises(ValueError) as err:
        model_cost(net, (1, 8, 8), {rule_name: rule})
    assert str(err.value) == message
    skipped: dict[str, str] = {}
    assert model_cost(net, (1, 8, 8), {rule_name: rule}, skipped=skipped) == {} and skipped == {rule_name: message}


def _matrices(rule) -> int:
    """Values in the rule's own matrices (its checkpoint state without the random generator's)."""
    state = {k: v for k, v in rule.state_dict().items() if k != "rng"}
    return sum(t.numel() for t in torch.utils._pytree.tree_flatten(state)[0] if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("spec, rules", [
    ("f-l16-tanh-l12-tanh-l8-tanh-l3", [*RULES, "ftp-every"]),
    ("r4s2-r4-f-l3", ["fa", "dfa", "drtp", "pepita", "ftp", "ftp-every"]),  # block 1 has three convs
])
def test_rule_state_is_the_rules_matrices(spec, rules):
    """`bytes_rule_state` is what the rule holds after a step: it left out FTP's G_deep (inject="every"), and gave
    FA's first block feedback matrices for none of its weights past the first (a residual first block has three)."""
    torch.manual_seed(0)
    net = build_model("spec", (1, 8, 8), 3, activation="relu", spec=spec)
    for label in rules:
        rule = make_rule("ftp", inject="every") if label == "ftp-every" else make_rule(label)
        rule.step(net, torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))
        r = model_cost(net, (1, 8, 8), {label: rule}, bytes_per_value=2)[label]
        assert r["bytes_rule_state"] == 2 * _matrices(rule), label


def test_cli_cost_refuses_when_no_rule_runs_on_the_model(capsys):
    """Every rule asked for refusing the model printed an empty table and exit 0; bad sizes name their option."""
    assert main(["cost", "--rules", "dtp,ff", "--dataset", "mnist", "--model", "paper-cnn"]) == 2
    err = capsys.readouterr().err
    assert "no rule asked for runs on this model" in err and "dtp supports MLPs only" in err and "ff supports" in err
    assert main(["cost", "--rules", "bp,dtp", "--dataset", "mnist", "--model", "paper-cnn"]) == 0  # bp runs: a note
    assert "dtp left out" in capsys.readouterr().err
    for option in ("--batch-size", "--bytes-per-value"):
        assert main(["cost", "--rules", "bp", "--dataset", "mnist", option, "0"]) == 2
        assert f"{option} must be >= 1, got 0" in capsys.readouterr().err
