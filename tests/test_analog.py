"""The analog crossbar: presets and parsing, ideal = float, quantized states, and noise statistics that match their
parameters (read, backward read, write, cycle-to-cycle, asymmetry, nonlinearity, converters)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ftprop.analog import PRESETS, AnalogCrossbar, DeviceSpec, on_touched, parse_device, pulse_update
from ftprop.hardware import attach, check_hardware, quant_scale
from ftprop.models import Block, Net, mlp
from ftprop.rules import RULES, make_rule
from ftprop.train import TrainConfig


def test_parse_device():
    assert parse_device("reram") == PRESETS["reram"]
    assert parse_device("") .is_ideal and parse_device("ideal").is_ideal and parse_device("none").is_ideal
    spec = parse_device("reram:read_noise=0.05, n_states=129")
    assert spec.read_noise == 0.05 and spec.n_states == 129 and spec.c2c_noise == PRESETS["reram"].c2c_noise
    for bad, msg in [("rram", "unknown preset 'rram'"), ("reram:noise=1", "cannot read override"),
                     ("reram:n_states=many", "needs a number"), ("reram:n_states=1", "n_states must be"),
                     ("reram:asymmetry=1", "asymmetry"), ("ideal:c2c_noise=1", "need a device")]:
        with pytest.raises(ValueError, match=msg):
            parse_device(bad)
    with pytest.raises(ValueError, match="weight/update bits"):
        check_hardware("w8a8", "nearest", "reram")
    check_hardware("a8e8", "nearest", "reram")  # digital activations/errors with analog weights: fine
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(analog="flash")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(DeviceSpec) if f.name != "name"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_device_parameter_must_be_finite(field, value):
    """NaN passed every range check (a comparison with NaN is False) and infinity the noise and w_range checks, so
    `reram:read_noise=nan` trained at chance without an error."""
    with pytest.raises(ValueError, match=f"analog: {field} must be a finite number, got {value}"):
        DeviceSpec(**{field: float(value)})
    if field not in ("n_states", "dac_bits", "adc_bits"):  # integer overrides already refuse "nan" as a number
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            TrainConfig(analog=f"reram:{field}={value}")


def steps(rule: str, analog: str, n: int = 5, seed: int = 0):
    torch.manual_seed(0)
    model = mlp(20, (16, 12), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hw = attach(model, opt, analog=analog, seed=seed)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 20, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    r = make_rule(rule)
    for i in range(n):
        r.step(model, x[i % 2::2], y[i % 2::2])
        opt.step()
    return model, hw


@pytest.mark.parametrize("rule", list(RULES))
def test_ideal_preset_reproduces_float_training(rule):
    ref, _ = steps(rule, "")
    got, hw = steps(rule, "ideal")
    assert not hw
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), got.parameters()))


def test_a_fine_noiseless_device_tracks_float_training():
    """2^20 states, no noise, linear symmetric steps, ideal converters: the machinery itself changes ~nothing."""
    ref, _ = steps("bp", "")
    fine, hw = steps("bp", "ideal:n_states=1048577")
    assert hw and "analog" in hw.parts
    for a, b in zip(ref.parameters(), fine.parameters()):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_trains_on_every_preset(rule):
    for preset in ("reram", "poor"):
        model, hw = steps(rule, preset)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        for arr in hw.parts["analog"].arrays:
            n = hw.parts["analog"].spec.n_states - 1
            for g in (arr.g_plus, arr.g_minus):  # conductances stay on their levels, inside [0, 1]
                k = g * n
                assert (k - k.round()).abs().max() < 1e-3 and g.min() >= 0 and g.max() <= 1


def test_states_are_quantized_and_weights_take_the_pair_levels():
    torch.manual_seed(0)
    model, hw = steps("ftp", "reram:n_states=9,write_noise=0,read_noise=0,c2c_noise=0", n=20)
    xbar = hw.parts["analog"]
    for arr in xbar.arrays:
        w = arr.module.weight.detach()
        levels = torch.round(w / arr.w_max * 8)  # w = w_max (k+ - k-) / 8
        assert torch.allclose(w, levels * arr.w_max / 8, atol=1e-6)
        assert levels.unique().numel() <= 2 * 8 + 1


def test_read_noise_matches_its_parameter():
    torch.manual_seed(0)
    layer = nn.Linear(50, 3)
    net = Net([Block(nn.Linear(50, 50), nn.Tanh()), Block(layer)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    xbar = AnalogCrossbar(net, opt, DeviceSpec(read_noise=0.04), seed=0)
    x = torch.randn(1, 50)
    clean = nn.functional.linear(x, layer.weight, layer.bias)
    outs = torch.cat([layer(x) for _ in range(20000)])
    arr = xbar.arrays[1]
    expected = 0.04 * arr.w_max * x.norm()
    assert torch.allclose(outs.mean(0), clean[0], atol=5 * float(expected) / 20000 ** 0.5)
    assert torch.allclose(outs.std(0), expected.expand(3), rtol=0.03)


def test_read_noise_on_convolutions_uses_the_receptive_field():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    net = Net([Block(conv, nn.ReLU()), Block(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)))])
    xbar = AnalogCrossbar(net, torch.optim.SGD(net.parameters(), lr=0.1), DeviceSpec(read_noise=0.1), seed=0)
    x = torch.randn(1, 2, 4, 4)
    outs = torch.cat([conv(x) for _ in range(5000)])
    patches = nn.functional.unfold(x, 3, padding=1)  # (1, 2*9, 16)
    expected = 0.1 * xbar.arrays[0].w_max * patches.pow(2).sum(1).sqrt().view(1, 4, 4)
    assert torch.allclose(outs.std(0), expected.expand(3, 4, 4), rtol=0.06)


def test_backward_reads_are_noisy_too():
    """BP's W^T delta crosses the array: its noise is read_noise * w_max * |delta| per input gradient."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 40, bias=False)
    net = Net([Block(nn.Linear(3, 5), nn.Tanh()), Block(layer)])
    xbar = AnalogCrossbar(net, torch.optim.SGD(net.parameters(), lr=0.1), DeviceSpec(read_noise=0.05), seed=0)
    delta = torch.randn(1, 40)
    grads = []
    for _ in range(8000):
        x = torch.zeros(1, 5, requires_grad=True)
        layer(x).backward(delta)
        grads.append(x.grad)
    g = torch.cat(grads)
    expected = 0.05 * xbar.arrays[1].w_max * delta.norm()
    assert torch.allclose(g.mean(0), (delta @ layer.weight)[0], atol=5 * float(expected) / 8000 ** 0.5)
    assert torch.allclose(g.std(0), expected.expand(5), rtol=0.05)


def test_write_noise_matches_its_parameter_and_is_resampled_only_when_written():
    torch.manual_seed(0)
    net = Net([Block(nn.Linear(200, 300), nn.Tanh()), Block(nn.Linear(300, 2))])
    opt = torch.optim.SGD(net.parameters(), lr=1e-9)
    xbar = AnalogCrossbar(net, opt, DeviceSpec(n_states=101, write_noise=0.07), seed=0)
    arr = xbar.arrays[0]
    assert arr.deviation.std() / arr.w_max == pytest.approx(0.07, rel=0.02)
    before = arr.deviation.clone()
    net(torch.randn(4, 200)).sum().backward()
    opt.step()  # updates far below one step: almost no pulse, so almost no resampling
    same = (arr.deviation == before).float().mean()
    assert same > 0.99


def test_on_touched_sparse_and_dense_forms_agree():
    torch.manual_seed(0)
    keep, a, b = torch.randn(3, 40, 50).unbind(0)
    touched = torch.rand(40, 50) < 0.1
    dense = on_touched(touched, torch.add, keep, a, b, sparse=False)
    sparse = on_touched(touched, torch.add, keep, a, b, sparse=True)
    assert torch.equal(dense, sparse)
    assert torch.equal(dense[touched], (a + b)[touched]) and torch.equal(dense[~touched], keep[~touched])
    assert not torch.equal(keep, dense)  # a new tensor: the caller's stays as it was


@pytest.mark.parametrize("sparse", [False, True])
def test_pulse_statistics_match_the_parameters(sparse):
    gen = torch.Generator().manual_seed(0)
    n_states, pulses = 1001, 20
    step0 = 1 / (n_states - 1)
    g = torch.full((200000,), 0.5)
    dg = torch.full_like(g, pulses * step0)
    # cycle-to-cycle: variance of the change = c2c^2 * step0^2 * n (+ at most 1/4 step0^2 of level snapping)
    spec = DeviceSpec(n_states=n_states, c2c_noise=1.0)
    new, touched = pulse_update(g, dg, spec, gen, sparse)
    change = (new - g) / step0
    assert touched.all() and change.mean() == pytest.approx(pulses, abs=0.05)
    assert change.var() == pytest.approx(pulses * 1.0, rel=0.03)
    # asymmetry: up steps (1 + a), down steps (1 - a), at the symmetry point
    spec = DeviceSpec(n_states=n_states, asymmetry=0.25)
    up = (pulse_update(g, dg, spec, gen, sparse)[0] - g).mean() / step0
    down = (g - pulse_update(g, -dg, spec, gen, sparse)[0]).mean() / step0
    assert up == pytest.approx(pulses * 1.25, rel=0.01) and down == pytest.approx(pulses * 0.75, rel=0.01)
    # nonlinearity (soft bounds): potentiation steps shrink toward g = 1, depression steps toward g = 0
    spec = DeviceSpec(n_states=n_states, nonlinearity=1.0)
    for g0, factor_up, factor_down in [(0.25, 1.5, 0.5), (0.75, 0.5, 1.5)]:
        gg = torch.full_like(g, g0)
        up = (pulse_update(gg, dg, spec, gen, sparse)[0] - gg).mean() / step0
        down = (gg - pulse_update(gg, -dg, spec, gen, sparse)[0]).mean() / step0
        assert up == pytest.approx(pulses * factor_up, rel=0.01)
        assert down == pytest.approx(pulses * factor_down, rel=0.01)
    # fractional requests: the pulse count is stochastic and unbiased
    spec = DeviceSpec(n_states=n_states)
    small = pulse_update(g, torch.full_like(g, 0.3 * step0), spec, gen, sparse)[0]
    assert ((small - g) / step0).mean() == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_nan_request_reaches_the_device(sparse):
    """A NaN update (a diverged optimizer) used to count as no pulse, so the devices silently dropped it; now the
    pair turns NaN, the presented weight too, and the training loop sees it. Finite requests move as before."""
    g = torch.full((6,), 0.5)
    dg = torch.tensor([float("nan"), 0.0, 0.3, -0.3, 1e-6, 0.0])
    new, touched = pulse_update(g, dg, PRESETS["reram"], torch.Generator().manual_seed(0), sparse)
    assert touched[0] and new[0].isnan() and torch.isfinite(new[1:]).all()
    assert torch.equal(touched[1:], torch.tensor([False, True, True, False, False]))


def test_converters_quantize_inputs_and_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    net = Net([Block(layer, nn.Tanh()), Block(nn.Linear(20, 3))])
    AnalogCrossbar(net, torch.optim.SGD(net.parameters(), lr=0.1), DeviceSpec(dac_bits=4, adc_bits=5), seed=0)
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    layer(torch.randn(8, 30))
    x, y = seen["x"], seen["y"] - layer.bias
    for t, bits in ((x, 4), (y, 5)):
        k = t / quant_scale(t, bits, "max")
        assert (k - k.round()).abs().max() < 1e-3 and k.round().unique().numel() <= 2 ** bits


@pytest.mark.parametrize("rule", ["bp", "ftp"])
def test_remove_leaves_the_model_as_it_found_it(rule):
    """The input hook used to hand the backward read's box to the output hook through an attribute of the layer,
    which stayed after remove() (the last one holding a delta tensor of the last step)."""
    torch.manual_seed(0)
    model = mlp(20, (16, 12), 4)
    before = {name: set(m.__dict__) for name, m in model.named_modules()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xbar = AnalogCrossbar(model, opt, parse_device("reram"), seed=0)
    make_rule(rule).step(model, torch.randn(8, 20), torch.randint(0, 4, (8,)))
    opt.step()
    assert all(arr.pending is None for arr in xbar.arrays)  # no delta kept past its step
    xbar.remove()
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_analog_state_round_trips():
    _, hw = steps("ftp", "reram", n=3)
    state = hw.state_dict()
    _, other = steps("ftp", "reram", n=1, seed=5)
    other.load_state_dict(state)
    for a, b in zip(hw.parts["analog"].arrays, other.parts["analog"].arrays):
        assert torch.equal(a.g_plus, b.g_plus) and torch.equal(a.deviation, b.deviation)
    with pytest.raises(ValueError, match="this run simulates"):
        other.load_state_dict({})
    assert dataclasses.asdict(PRESETS["reram"])["n_states"] == 1001
