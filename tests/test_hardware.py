"""Low-precision training: the spec, the quantizers, interception for every rule, exact float fallback, resume."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from ftprop.hardware import LowPrecision, attach, parse_quant, quant_scale, quantize
from ftprop.models import mlp
from ftprop.rules import RULES, make_rule
from ftprop.train import TrainConfig, train

train_mod = importlib.import_module("ftprop.train")


def test_parse_quant():
    s = parse_quant("w8a6e4u16", rounding="stochastic")
    assert (s.weights, s.activations, s.errors, s.updates, s.rounding) == (8, 6, 4, 16, "stochastic")
    assert str(s) == "w8a6e4u16"
    assert parse_quant("a8").weights == 32 and parse_quant("a8").activations == 8
    assert parse_quant("e8W4").weights == 4  # any order, any case
    for empty in ("", "none", "fp32", None):
        assert parse_quant(empty).is_float
    assert parse_quant("w32a32e32u32").is_float
    for bad, msg in [("w8x8", "unknown letter 'x'"), ("w8w4", "given twice"), ("w1", "from 2 to 32"),
                     ("w64", "from 2 to 32"), ("w", "needs a number"), ("8bit", "cannot read"),
                     ("w8-a8", "cannot read")]:
        with pytest.raises(ValueError, match=msg):
            parse_quant(bad)
    with pytest.raises(ValueError, match="rounding must be one of nearest, stochastic"):
        parse_quant("w8", rounding="up")
    with pytest.raises(ValueError, match="rounding"):
        TrainConfig(quant="w8", rounding="sideways")
    with pytest.raises(ValueError, match="unknown letter"):
        TrainConfig(quant="z8")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scale", ["pow2", "max"])
def test_quantized_tensors_take_only_the_allowed_levels(bits, rounding, scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * 3
    q = quantize(x, bits, rounding, scale, generator=torch.Generator().manual_seed(1))
    s = quant_scale(x, bits, scale)
    k = q / s
    if scale == "pow2":  # a power of two: true fixed point, exact integers, requantizing changes nothing
        assert torch.log2(s) == torch.log2(s).round()
        assert torch.equal(k, k.round())
        assert torch.equal(quantize(q, bits, "nearest", scale), q)
    else:  # a float scale: integers up to rounding of q * s
        assert (k - k.round()).abs().max() < 1e-4
        k = k.round()
    assert k.min() >= -(2 ** (bits - 1)) and k.max() <= 2 ** (bits - 1) - 1
    assert q.unique().numel() <= 2 ** bits                               # at most 2^b distinct values
    assert (q - x).abs().max() <= (s / 2 if rounding == "nearest" else s) * (1 + 1e-5)
    assert s * (2 ** (bits - 1) - 1) >= x.abs().max()                  # nothing clips


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scale", ["pow2", "max"])
def test_non_finite_values_stay_non_finite(bad, rounding, scale):
    """A NaN or an infinity is never rounded onto the grid (the nearest kernel used to map NaN to -128 s with s = 1):
    the step is non-finite and so is every value quantized with it, so a diverged run shows in its loss and weights."""
    x = torch.tensor([bad, 0.3, -0.2, 0.05, 0.0])
    assert not torch.isfinite(quant_scale(x, 8, scale))
    q = quantize(x, 8, rounding, scale, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(q).any(), q
    assert torch.isfinite(quantize(x[1:], 8, rounding, scale, generator=torch.Generator().manual_seed(0))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 300.0])
def test_stochastic_rounding_of_16_bit_floats_is_the_float32_rounding(dtype, magnitude):
    """A float16 tensor of values near 1e-6 has a step (2^-25) below float16's range: it became 0, 1/s inf, and the
    result NaN and zeros. 16-bit tensors now round in float32 and come back exactly on the grid."""
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * magnitude).to(dtype)
    q = quantize(x, 8, "stochastic", generator=torch.Generator().manual_seed(1))
    ref = quantize(x.float(), 8, "stochastic", generator=torch.Generator().manual_seed(1))
    assert q.dtype == dtype and torch.equal(q.float(), ref)            # the float32 result, exactly representable
    s = quant_scale(x, 8)
    k = q.float() / s
    assert torch.equal(k, k.round()) and k.abs().max() <= 128 and ((q.float() - x.float()).abs() < s).all()
    dither = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))  # LowPrecision's shared dither
    assert torch.equal(quantize(x, 8, "stochastic", dither=dither).float(), ref)


def test_stochastic_rounding_is_unbiased():
    x = torch.tensor([0.1, -0.37, 0.5, 0.93, -1.0, 0.013]).repeat(20000, 1)  # one tensor: one scale for all draws
    q = quantize(x, 4, "stochastic", "pow2", generator=torch.Generator().manual_seed(0))
    s = float(quant_scale(x, 4))
    err = (q.mean(0) - x[0]).abs()
    assert (err < 4 * (s / 2) / 20000 ** 0.5).all(), err                 # within 4 standard errors
    near = quantize(x[0], 4, "nearest", "pow2")
    assert (near - x[0]).abs().max() > 5 * err.max()                     # nearest is biased at this resolution
    assert torch.equal(quantize(torch.zeros(3), 8, "stochastic"), torch.zeros(3))


def test_passes_of_one_training_step_share_the_dither_at_each_activation():
    """rounding="stochastic": a second pass through the same blocks in one step (a rule's target pass) rounds with
    the first pass's dither, so equal inputs give equal activations and a small input change moves them by an
    unbiased amount whose spread is far below independent rounding's; the next step (after the optimizer) and
    evaluation draw anew. "stochastic-fresh" draws anew every time."""
    torch.manual_seed(0)
    model = mlp(20, (256,), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hw = LowPrecision(model, opt, parse_quant("a4", rounding="stochastic"), seed=0)
    x = torch.randn(512, 20)
    shift = 0.03 * torch.randn(20)
    first, again = model(x), model(x)
    h = lambda v: model.blocks[0].post(model.blocks[0].layer(v))  # noqa: E731  (block 0's quantized output)
    assert torch.equal(first, again) and torch.equal(h(x), h(x))
    with torch.no_grad():
        ref = torch.tanh(model.blocks[0].layer(x))
        exact = torch.tanh(model.blocks[0].layer(x + shift)) - ref
    diff = h(x + shift) - h(x)
    s = float(quant_scale(ref, 4))
    assert (diff - exact).mean().abs() < 0.05 * s                    # unbiased
    assert (diff - exact).pow(2).mean() < 0.5 * s ** 2 / 6            # independent draws: about s^2 / 6 (two draws)
    opt.step()
    assert not torch.equal(model(x), first)                          # a new step, a new dither
    model.eval()
    assert not torch.equal(model(x), model(x))                       # evaluation never shares
    model.train()
    hw.remove()
    fresh = LowPrecision(model, opt, parse_quant("a4", rounding="stochastic-fresh"), seed=0)
    assert not torch.equal(model(x), model(x))
    fresh.remove()


def tiny_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 20, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def run_steps(rule_name: str, quant: str = "", rounding: str = "nearest", analog: str = "", steps: int = 5,
              trace: bool = False):
    torch.manual_seed(0)
    model = mlp(20, (16, 12), 4, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hw = attach(model, opt, quant, rounding, analog, seed=0)
    if trace:
        hw.parts["quant"].trace = []
    rule = make_rule(rule_name)
    x, y = tiny_problem()
    for i in range(steps):
        rule.step(model, x[i % 2::2], y[i % 2::2])
        opt.step()
    return model, hw


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_is_quantized_everywhere(rule):
    """Errors reach every block each rule trains (FF does not train the output block), activations every block,
    and every traced tensor, weights and updates included, lies on its grid."""
    model, hw = run_steps(rule, "w8a6e5u4", "stochastic", trace=True)
    bits = {"weight": 8, "activation": 6, "error": 5, "update": 4}
    where: dict[str, set[str]] = {k: set() for k in bits}
    for kind, at, t in hw.parts["quant"].trace:
        where[kind].add(at)
        k = t / quant_scale(t, bits[kind])
        assert torch.equal(k, k.round()) and k.abs().max() <= 2 ** (bits[kind] - 1), (kind, at)
    trained = range(2) if rule == "ff" else range(3)
    assert {f"blocks.{i}.layer" for i in trained} <= where["error"], where["error"]
    assert {f"blocks.{i}.post" for i in range(2)} <= where["activation"]
    assert where["update"] and where["weight"]
    for p in model.parameters():
        k = p.detach() / quant_scale(p, 8)
        assert torch.equal(k, k.round())


@pytest.mark.parametrize("rule", list(RULES))
def test_32_bits_reproduces_the_float_run_exactly(rule):
    ref, _ = run_steps(rule)
    for rounding in ("nearest", "stochastic"):
        got, hw = run_steps(rule, "w32a32e32u32", rounding)
        assert not hw  # nothing attached
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), got.parameters()))
    low, _ = run_steps(rule, "w8a8e8u8")
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), low.parameters()))


def test_errors_only_changes_the_learning_signal_not_the_forward():
    """e-bits alone: the forward is float, so only the updates differ from the float run."""
    torch.manual_seed(0)
    model = mlp(20, (16,), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    LowPrecision(model, opt, parse_quant("e3"))
    x, _ = tiny_problem()
    torch.manual_seed(0)
    ref = mlp(20, (16,), 4)
    assert torch.equal(model(x), ref(x))


def test_remove_restores_float():
    torch.manual_seed(0)
    model = mlp(20, (16,), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hw = LowPrecision(model, opt, parse_quant("a4"))
    x, _ = tiny_problem()
    low = model(x)
    hw.remove()
    assert not torch.equal(low, model(x))


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(hidden="64", epochs=3, batch_size=64, progress=False, out=str(tmp_path / "run"), rule="ftp",
                quant="w8a8e8u8", rounding="stochastic")
    return TrainConfig(**{**base, **kw})


def _params(run_dir) -> list[torch.Tensor]:
    return list(torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"].values())


@pytest.fixture
def mini_mnist(small_mnist):
    return dataclasses.replace(small_mnist, x_train=small_mnist.x_train[:1000], y_train=small_mnist.y_train[:1000],
                               x_test=small_mnist.x_test[:500], y_test=small_mnist.y_test[:500])


def test_quantized_run_resumes_bit_identically(mini_mnist, tmp_path, monkeypatch):
    full = train(_cfg(tmp_path / "full"), mini_mnist)
    real_save, saves = train_mod._atomic_save, []

    def crash_after_first_epoch(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_atomic_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut"), mini_mnist)
    monkeypatch.setattr(train_mod, "_atomic_save", real_save)
    resumed = train(_cfg(tmp_path / "cut"), mini_mnist, resume=True)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(_params(tmp_path / "full" / "run"), _params(tmp_path / "cut" / "run")))


def test_float_config_is_bit_identical_through_train(mini_mnist, tmp_path):
    a = train(_cfg(tmp_path / "a", epochs=1, quant="", rounding="nearest"), mini_mnist)
    b = train(_cfg(tmp_path / "b", epochs=1, quant="w32a32e32u32"), mini_mnist)
    assert a["test_accuracy"] == b["test_accuracy"]
    assert all(torch.equal(x, y) for x, y in zip(_params(tmp_path / "a" / "run"), _params(tmp_path / "b" / "run")))


def test_ftp_learns_in_8_bits_with_stochastic_rounding(small_mnist, tmp_path):
    """4000 images, 4 epochs, 784-128-64-10 tanh: 8-bit weights, activations, errors and updates stay close to
    float (the issue's target, 0.5 points on the full run, is for `reproduce hardware`)."""
    run = lambda **kw: train(_cfg(tmp_path / str(len(kw)), hidden="128,64", epochs=4, lr=0.03, **kw),  # noqa: E731
                             small_mnist)["test_accuracy"]
    low, flt = run(), run(quant="", rounding="nearest")
    assert low > 0.85 and low > flt - 0.03, (low, flt)


def test_cli_flags(capsys, tmp_path):
    import json

    from ftprop.cli import main
    fast = ["--hidden", "32", "--epochs", "1", "--val-size", "59000", "--no-progress"]
    code = main(["train", "--rule", "ftp", *fast, "--quant", "w8a8e8u8", "--rounding", "stochastic",
                 "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (config["quant"], config["rounding"], config["analog"]) == ("w8a8e8u8", "stochastic", "")
    code = main(["train", "--rule", "dfa", *fast, "--quant", "a8e8", "--analog", "reram:read_noise=0.03",
                 "--out", str(tmp_path / "a")])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    for bad, msg in [(["--quant", "w8q8"], "unknown letter 'q'"), (["--analog", "flash"], "unknown preset"),
                     (["--quant", "w8", "--analog", "reram"], "weight/update bits")]:
        assert main(["train", *fast, *bad]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("hardware", [dict(quant="w8a8e8u8", rounding="nearest"),
                                      dict(quant="w8a8e8u8", rounding="stochastic"),
                                      dict(quant="a8e8", rounding="nearest", analog="reram")])
def test_a_nan_gradient_makes_a_quantized_or_analog_run_diverge(hardware, mini_mnist, monkeypatch):
    """One NaN in one gradient of the third step: the float run's weights turn NaN and the loop stops. Quantization
    used to round the NaN weight to -128 s and the rest of its tensor to 0, and the devices took a NaN update for no
    pulse, so these runs went on at chance; now the next step's loss is NaN and the loop reports it."""
    build, calls = TrainConfig.build_model, []

    def build_with_a_bad_gradient(self, *args):
        model = build(self, *args)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) == 3:
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
            return grad
        model.blocks[0].layer.weight.register_hook(poison)
        return model

    monkeypatch.setattr(TrainConfig, "build_model", build_with_a_bad_gradient)
    cfg = TrainConfig(rule="bp", hidden="16", epochs=1, batch_size=100, progress=False, **hardware)
    with pytest.raises(train_mod.TrainingDiverged, match="loss became nan at epoch 1, step 4"):
        train(cfg, mini_mnist)
