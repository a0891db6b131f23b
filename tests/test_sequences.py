"""Recurrent nets (issue 5): task definitions, the ETT protocol, BPTT, FTP and DFA through time against their
equations computed by hand, the training loop, the CLI and the study, all on tiny data."""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import re

import pytest
import torch

from ftprop import cli, report, seqtrain
from ftprop.data import DatasetError
from ftprop.recurrent import CELLS, ElmanCell, build_recurrent
from ftprop.rules import SEQUENCE_RULES, make_sequence_rule
from ftprop.rules._recurrent import local_unroll, sequence_loss
from ftprop.seqtrain import SeqConfig, linear_baseline, train_sequences
from ftprop.sequences import (ETT_COLUMNS, adding_problem, ett_borders, load_ett, load_sequence_task,
                              load_statsmodels_series, locate_sequence_task, read_statsmodels_series,
                              split_and_window, temporal_order)


# --- tasks ----------------------------------------------------------------------------------------------------------

def test_adding_problem_definition():
    x, y = adding_problem(500, 20, seed=3)
    assert x.shape == (500, 20, 2) and y.shape == (500, 1)
    values, marker = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert torch.equal(marker.sum(1), torch.full((500,), 2.0))
    assert torch.equal(marker[:, :10].sum(1), torch.ones(500))  # one marker in each half
    assert torch.allclose(y[:, 0], (values * marker).sum(1))
    assert torch.equal(adding_problem(500, 20, seed=3)[0], x)  # fixed seed, fixed data
    assert abs(((y - 1) ** 2).mean().item() - 1 / 6) < 0.03  # predicting the mean scores var(U + U) = 1/6


@pytest.mark.parametrize("classes, windows", [(4, [(10, 20), (50, 60)]), (8, [(10, 20), (33, 43), (66, 76)])])
def test_temporal_order_definition(classes, windows):
    x, y = temporal_order(400, 100, classes, seed=1)
    assert x.shape == (400, 100, 8) and y.shape == (400,) and y.dtype == torch.int64
    assert torch.equal(x.sum(2), torch.ones(400, 100))  # one-hot
    symbols = x.argmax(2)
    assert (symbols[:, 0] == 6).all() and (symbols[:, -1] == 7).all()  # B first, E last
    relevant = (symbols == 4) | (symbols == 5)
    assert torch.equal(relevant.sum(1), torch.full((400,), len(windows)))
    for i in range(400):
        pos = relevant[i].nonzero().flatten().tolist()
        assert all(lo <= p <= hi for p, (lo, hi) in zip(pos, windows))
        bits = [int(symbols[i, p] == 5) for p in pos]  # X = 0, Y = 1, earliest most significant
        assert y[i].item() == int("".join(map(str, bits)), 2)
    assert set(y.tolist()) == set(range(classes))


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="4 or 8"):
        temporal_order(10, 100, 5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        temporal_order(10, 5, 8, seed=0)
    with pytest.raises(ValueError, match="T must be >= 2"):
        adding_problem(10, 1, seed=0)
    with pytest.raises(ValueError, match="unknown sequence task"):
        load_sequence_task("nope")


@pytest.mark.parametrize("task", ["ett", "sunspots", "co2"])
@pytest.mark.parametrize("option, value", [("lookback", 0), ("lookback", -2), ("horizon", 0), ("horizon", -3)])
def test_look_back_and_horizon_must_be_at_least_one(task, option, value, tmp_path, capsys):
    """0 used to stand for the task's default (`lookback or 24`), and a negative window built data of inconsistent
    shapes or failed later with a message naming neither option; now each is refused by name, before any file is
    read, by the loader, by SeqConfig and so by the command line."""
    msg = f"{option} must be >= 1, got {value}"
    with pytest.raises(ValueError, match=msg):
        load_sequence_task(task, csv_path=str(tmp_path / "missing.csv"), **{option: value})
    with pytest.raises(ValueError, match=msg):
        SeqConfig(task=task, **{option: value})
    assert cli.main(["sequences", "--task", task, f"--{option}", str(value)]) == 2
    assert msg in capsys.readouterr().err


def _write_ett(path, rows: int, every: datetime.timedelta, seed: int = 0) -> torch.Tensor:
    values = torch.randn(rows, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 10
    start = datetime.datetime(2016, 7, 1)
    lines = [",".join(ETT_COLUMNS)] + [f"{start + i * every:%Y-%m-%d %H:%M:%S}," + ",".join(repr(v) for v in row)
                                       for i, row in enumerate(values.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return values


def test_ett_split_indices_are_the_standard_ones():
    hourly = [datetime.datetime(2016, 7, 1) + datetime.timedelta(hours=i) for i in range(17420)]
    assert ett_borders(hourly, 96) == [(0, 8640), (8544, 11520), (11424, 14400)]  # ETTh1 at look-back 96
    quarter = [datetime.datetime(2016, 7, 1) + datetime.timedelta(minutes=15 * i) for i in range(57600)]
    assert ett_borders(quarter, 96) == [(0, 34560), (34464, 46080), (45984, 57600)]  # ETTm1
    with pytest.raises(DatasetError, match="needs 14400 rows"):
        ett_borders(hourly[:14000], 96)


def test_ett_windows_and_zscore_on_a_tiny_csv(tmp_path, monkeypatch):
    """Daily rows: a 30-row month, so the 12/4/4 split is train [0, 360), val [360, 480), test [480, 600)."""
    path = tmp_path / "tiny.csv"
    values = _write_ett(path, 610, datetime.timedelta(days=1))
    data = load_ett(path, lookback=96, horizon=96)
    train = values[:360]
    normed = (values - train.mean(0)) / train.std(0)
    assert data.x_train.shape == (360 - 192 + 1, 96, 7) and data.y_train.shape == (169, 96 * 7)
    assert data.x_val.shape[0] == 480 - 264 - 192 + 1 and data.x_test.shape[0] == 600 - 384 - 192 + 1
    assert torch.allclose(data.x_train[5], normed[5:101].float())
    assert torch.allclose(data.y_train[5].view(96, 7), normed[101:197].float())
    assert torch.allclose(data.y_val[0].view(96, 7)[0], normed[360].float())  # first val target: first val row
    assert torch.allclose(data.y_test[-1].view(96, 7)[-1], normed[599].float())  # last test target: row 599
    assert torch.allclose(data.x_train.reshape(-1, 7).mean(0), torch.zeros(7), atol=0.15)
    monkeypatch.setenv("FTPROP_ETT", str(path))  # the default path comes from the environment when set
    assert torch.equal(load_sequence_task("etth1").x_test, data.x_test)


def test_ett_errors_say_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("FTPROP_ETT", raising=False)
    with pytest.raises(DatasetError, match="ETDataset"):
        load_ett(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="96, 192, 336, 720"):
        load_ett(tmp_path / "missing.csv", horizon=100)
    bad = tmp_path / "bad.csv"
    bad.write_text("date,a,b\n2016-07-01 00:00:00,1,2\n")
    with pytest.raises(DatasetError, match="expected the ETT header"):
        load_ett(bad)
    with pytest.raises(ValueError, match="too short"):
        split_and_window("x", torch.randn(50, 1), [(0, 50)] * 3, 40, 20)


@pytest.mark.skipif(importlib.util.find_spec("statsmodels") is None, reason="statsmodels not installed")
def test_statsmodels_series_read_offline():
    sun = read_statsmodels_series("sunspots")
    assert sun.shape == (309, 1) and sun[0, 0] == 5.0 and sun[1, 0] == 11.0
    co2 = read_statsmodels_series("co2")
    assert co2.shape == (2284, 1) and torch.isfinite(co2).all()
    assert co2[6, 0] == pytest.approx((co2[5, 0] + co2[7, 0]) / 2)  # 1958-05-10 is missing: interpolated
    data = load_statsmodels_series("sunspots")
    assert data.x_train.shape[1:] == (24, 1) and data.y_train.shape[1] == 8 and not data.classification
    with pytest.raises(ValueError, match="unknown series"):
        read_statsmodels_series("nope")


def test_missing_statsmodels_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps statsmodels"):
        read_statsmodels_series("sunspots")
    with pytest.raises(DatasetError, match="pip install --no-deps statsmodels"):
        locate_sequence_task("co2")


def test_locate_sequence_task_finds_the_file_a_task_reads_without_reading_it(tmp_path, monkeypatch):
    assert locate_sequence_task("adding") is None and locate_sequence_task("order") is None  # generated
    empty = tmp_path / "empty.csv"
    empty.touch()  # loading it would fail on its header
    assert locate_sequence_task("ett", empty) == empty
    monkeypatch.setenv("FTPROP_ETT", str(empty))
    assert locate_sequence_task("etth1") == empty
    monkeypatch.setenv("FTPROP_ETT", str(tmp_path / "missing.csv"))
    with pytest.raises(DatasetError, match="ETT CSV not found at .*missing.csv. Get ETTh1.csv from the ETDataset"):
        locate_sequence_task("ett")
    with pytest.raises(ValueError, match="unknown sequence task 'nope'"):
        locate_sequence_task("nope")


# --- rules against their equations ----------------------------------------------------------------------------------

def _tiny(cell: str = "elman", outputs: int = 2, layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    net = build_recurrent(cell, 2, 4, outputs, layers).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(5, outputs, generator=gen, dtype=torch.float64)
    return net, x, y


def _grads(net) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("classification", [False, True])
def test_bptt_equals_autograd_of_torch_rnn(classification):
    """BPTT on the Elman net gives the gradient of torch.nn.RNN (an independent implementation) with the same
    weights."""
    net, x, y = _tiny()
    if classification:
        y = torch.tensor([0, 1, 1, 0, 1])
    out = make_sequence_rule("bptt").step(net, x, y)
    ref = torch.nn.RNN(2, 4, batch_first=True, nonlinearity="tanh").double()
    cell = net.cells[0]
    with torch.no_grad():
        ref.weight_ih_l0.copy_(cell.inp.weight)
        ref.weight_hh_l0.copy_(cell.rec.weight)
        ref.bias_ih_l0.copy_(cell.inp.bias)
        ref.bias_hh_l0.zero_()
    readout = torch.nn.Linear(4, 2).double()
    readout.load_state_dict(net.readout.state_dict())
    z = readout(ref(x)[0][:, -1])
    loss = sequence_loss(z, y)
    loss.backward()
    assert torch.allclose(out.loss, loss) and torch.allclose(out.logits, z)
    assert torch.allclose(cell.inp.weight.grad, ref.weight_ih_l0.grad)
    assert torch.allclose(cell.rec.weight.grad, ref.weight_hh_l0.grad)
    assert torch.allclose(cell.inp.bias.grad, ref.bias_ih_l0.grad)
    assert torch.allclose(net.readout.weight.grad, readout.weight.grad)


def _elman_by_hand(net, x):
    c = net.cells[0]
    W, U, b = c.inp.weight, c.rec.weight, c.inp.bias
    hs, h = [], torch.zeros(x.shape[0], 4, dtype=x.dtype)
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ W.T + h @ U.T + b)
        hs.append(h)
    return hs, hs[-1] @ net.readout.weight.T + net.readout.bias


def _local_update_by_hand(net, x, hs, deltas):
    """sum_t of the local gradient of one Elman step: d_t = delta_t * (1 - h_t^2); grad W = d_t^T x_t, ..."""
    gw = gu = gb = 0
    for t, (h, delta) in enumerate(zip(hs, deltas)):
        d = delta * (1 - h ** 2)
        prev = hs[t - 1] if t else torch.zeros_like(h)
        gw, gu, gb = gw + d.T @ x[:, t], gu + d.T @ prev, gb + d.sum(0)
    return gw, gu, gb


@pytest.mark.parametrize("inject", ["first", "every"])
@pytest.mark.parametrize("tangent", [False, True])
def test_ftp_through_time_equals_its_formula(inject, tangent):
    """T = 3, hidden 4, MSE: nudge c = -gamma e G; tau_1 = h_1 + c, tau_t = tanh(W x_t + U tau_{t-1} + b)
    (+ c at every step for inject="every"); local error (h_t - tau_t) / (gamma B); readout on the true error."""
    net, x, y = _tiny()
    gamma = 0.3
    rule = make_sequence_rule("ftp", gamma=gamma, g_scale=0.5, inject=inject, tangent=tangent)
    out = rule.step(net, x, y)
    with torch.no_grad():
        hs, z = _elman_by_hand(net, x)
        e = z - y
        B = x.shape[0]
        nudge = -gamma * e @ rule.G
        c = net.cells[0]
        taus, tau = [], hs[0] + nudge
        for t in range(3):
            if t:
                tau = torch.tanh(x[:, t] @ c.inp.weight.T + tau @ c.rec.weight.T + c.inp.bias)
                tau = tau + nudge if inject == "every" else tau
            taus.append(tau)
        deltas = [(h - tau) / (gamma * B) for h, tau in zip(hs, taus)]
        if tangent:
            deltas = [d - (d * h).sum(1, keepdim=True) / (h * h).sum(1, keepdim=True) * h for d, h in zip(deltas, hs)]
        gw, gu, gb = _local_update_by_hand(net, x, hs, deltas)
        dz = 2 * e / e.numel()
    assert rule.G.shape == (2, 4) and torch.allclose(out.logits, z) and torch.allclose(out.loss, (e ** 2).mean())
    assert torch.allclose(c.inp.weight.grad, gw) and torch.allclose(c.rec.weight.grad, gu)
    assert torch.allclose(c.inp.bias.grad, gb)
    assert torch.allclose(net.readout.weight.grad, dz.T @ hs[-1]) and torch.allclose(net.readout.bias.grad, dz.sum(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ftp_through_time_half_precision_stays_finite_for_a_zero_state(dtype):
    """A sample with zero inputs and zero biases keeps a zero state: its tangent projection has nothing to project
    against and hands the error on. In float16 a clamp of |h|^2 at 1e-12 is 0, which gave 0 / 0 and NaN gradients;
    the shared projection keeps its norms in float32 (`tangential_rows`)."""
    net, x, y = _tiny()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") and not name.startswith("readout"):
                p.zero_()
    x[0] = 0
    net = net.to(dtype)
    make_sequence_rule("ftp", gamma=0.3, g_scale=0.5, tangent=True).step(net, x.to(dtype), y.to(dtype))
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("tangent", [False, True])
def test_ftp_final_equals_its_formula(tangent):
    """inject="final", Elman, T = 3: the final state's target offset c = -gamma e G reaches step t scaled by
    kappa_t = prod_{s > t} (1 - h_s^2) U_jj (each unit's own carry); local error (h_t - tau_t) / (gamma B)."""
    net, x, y = _tiny()
    gamma = 0.3
    rule = make_sequence_rule("ftp", gamma=gamma, g_scale=0.5, inject="final", tangent=tangent)
    out = rule.step(net, x, y)
    with torch.no_grad():
        hs, z = _elman_by_hand(net, x)
        e = z - y
        c = net.cells[0]
        k = [(1 - h ** 2) * torch.diagonal(c.rec.weight) for h in hs]
        kappas = [k[1] * k[2], k[2], torch.ones_like(hs[0])]
        deltas = [-kappa * (-gamma * e @ rule.G) / (gamma * 5) for kappa in kappas]
        if tangent:
            deltas = [d - (d * h).sum(1, keepdim=True) / (h * h).sum(1, keepdim=True) * h for d, h in zip(deltas, hs)]
        gw, gu, gb = _local_update_by_hand(net, x, hs, deltas)
    assert torch.allclose(out.logits, z)
    assert torch.allclose(c.inp.weight.grad, gw) and torch.allclose(c.rec.weight.grad, gu)
    assert torch.allclose(c.inp.bias.grad, gb)


def test_ftp_final_equals_eligibility_traces_run_forward_on_a_gru():
    """inject="final" on a GRU is computed with a reverse product of gates; a device would instead carry, forward in
    time, one eligibility trace per sample, unit and parameter, eps_t = u_t eps_{t-1} + d h_t / d theta (one step,
    inputs held), and update by (e G / B) . eps_T at the end. Built here that way, one backward call per sample, unit
    and step, the two updates agree."""
    net, x, y = _tiny("gru")
    rule = make_sequence_rule("ftp", inject="final")
    rule.step(net, x, y)
    got = _grads(net)
    cell = net.cells[0]
    params = dict(cell.named_parameters())
    with torch.no_grad():
        states, z = local_unroll(net, x)
        signal = (z - y) @ rule.G / 5
    traces = {n: torch.zeros(5, 4, *p.shape, dtype=p.dtype) for n, p in params.items()}
    prev = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(3):
        h = cell(x[:, t], prev)
        with torch.no_grad():
            u = torch.sigmoid(x[:, t] @ cell.inp.weight[:4].T + cell.inp.bias[:4] + prev @ cell.rec_gates.weight[:4].T)
        for b in range(5):
            for j in range(4):
                one_step = torch.autograd.grad(h[b, j], list(params.values()), retain_graph=True)
                for (n, trace), g in zip(traces.items(), one_step):
                    trace[b, j] = u[b, j] * trace[b, j] + g
        prev = h.detach()
    for n, trace in traces.items():
        assert torch.allclose(torch.einsum("bj,bj...->...", signal, trace), got["cells.0." + n]), n


def test_dfa_through_time_equals_its_formula():
    """Classification: e = p - y; every step's state gets e B / B; the readout the exact CE gradient."""
    net, x, _ = _tiny(outputs=3)
    y = torch.tensor([0, 2, 1, 1, 0])
    rule = make_sequence_rule("dfa")
    out = rule.step(net, x, y)
    with torch.no_grad():
        hs, z = _elman_by_hand(net, x)
        e = torch.softmax(z, 1) - torch.nn.functional.one_hot(y, 3)
        feedback = e @ rule.B[0] / 5
        gw, gu, gb = _local_update_by_hand(net, x, hs, [feedback] * 3)
    c = net.cells[0]
    assert rule.B[0].shape == (3, 4) and torch.allclose(out.logits, z)
    assert torch.allclose(c.inp.weight.grad, gw) and torch.allclose(c.rec.weight.grad, gu)
    assert torch.allclose(c.inp.bias.grad, gb)
    assert torch.allclose(net.readout.weight.grad, (e / 5).T @ hs[-1])


def test_no_gradient_crosses_time_or_layers():
    """The local unroll's graph of a step reaches no earlier step and no layer below; under FTP and DFA every cell
    call sees inputs that carry no graph (detached first pass, no_grad second pass)."""
    net, x, y = _tiny("gru", layers=2)
    states, _ = local_unroll(net, x)
    for l in range(2):
        for t in range(1, 3):
            past = [states[l][s] for s in range(t)] + ([states[0][t]] if l else [])
            assert all(g is None for g in torch.autograd.grad(states[l][t].sum(), past, allow_unused=True,
                                                              retain_graph=True))
    seen = []
    hooks = [cell.register_forward_pre_hook(lambda m, args: seen.extend(a.requires_grad for a in args))
             for cell in net.cells]
    for name, options in (("ftp", {}), ("ftp", {"inject": "final"}), ("dfa", {})):
        make_sequence_rule(name, **options).step(net, x, y)
    for h in hooks:
        h.remove()
    # two inputs per call; calls: ftp 2 passes x 2 layers x 3 steps, ftp final 6 + layer 2's 3 (layer 1's carry
    # reads the stored states), dfa 6
    assert len(seen) == 2 * (12 + 9 + 6) and not any(seen)


@pytest.mark.parametrize("inject", ["every", "final"])
def test_ftp_update_is_a_sum_of_one_step_gradients_on_a_stacked_gru(inject):
    """Two GRU layers: FTP's update equals the sum, over layers and steps, of the gradient of |h - tau|^2 / (2 gamma B)
    through ONE fresh cell call whose inputs are leaf tensors holding the first pass's values: the past enters a
    step's gradient only through the values of its forward inputs, never through a graph."""
    net, x, y = _tiny("gru", layers=2)
    rule = make_sequence_rule("ftp", gamma=0.2, inject=inject)
    rule.step(net, x, y)
    got = _grads(net)
    with torch.no_grad():
        states, z = local_unroll(net, x)
        offsets = rule.offsets(net, x, z - y, states)
        taus = [[h + o for h, o in zip(*pair)] for pair in zip(states, offsets)]
    net.zero_grad(set_to_none=True)
    for l, cell in enumerate(net.cells):
        for t in range(3):
            below = x[:, t] if l == 0 else states[0][t]
            prev = states[l][t - 1] if t else torch.zeros_like(states[l][0])
            h = cell(below.clone(), prev.clone())  # leaves: no graph to the past or to the layer below
            (((h - taus[l][t]) ** 2).sum() / (2 * rule.gamma * 5)).backward()
    for name, p in net.named_parameters():
        if not name.startswith("readout"):
            assert torch.allclose(p.grad, got[name]), name


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("name", list(SEQUENCE_RULES))
def test_every_rule_fills_every_grad_and_keeps_its_state(name, cell):
    net, x, y = _tiny(cell, layers=2)
    rule = make_sequence_rule(name)
    rule.step(net, x, y)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    first = _grads(net)
    again = make_sequence_rule(name)
    again.load_state_dict(rule.state_dict())
    again.step(net, x, y)
    assert all(torch.equal(first[k], v) for k, v in _grads(net).items())


@pytest.mark.parametrize("name", list(SEQUENCE_RULES))
def test_float64_targets_on_a_float32_net_train_as_float32_ones(name):
    """FTP and DFA through time failed in a matmul of mixed dtypes on float64 regression targets; BPTT promoted."""
    torch.manual_seed(0)
    net = build_recurrent("gru", 2, 4, 3)
    x, y = torch.randn(5, 6, 2), torch.randn(5, 3, dtype=torch.float64)
    make_sequence_rule(name).step(net, x, y.float())
    want = _grads(net)
    make_sequence_rule(name).step(net, x, y)
    assert all(torch.allclose(g, want[k], atol=1e-6) for k, g in _grads(net).items())


def test_class_targets_of_another_shape_are_refused():
    net, x, _ = _tiny()
    with pytest.raises(ValueError, match=r"class targets must have shape \(batch,\)"):
        make_sequence_rule("ftp").step(net, x, torch.zeros(5, 1, dtype=torch.int64))


def test_bad_inputs_raise_clear_errors():
    net, x, y = _tiny()
    rule = make_sequence_rule("ftp")
    with pytest.raises(ValueError, match="batch, time, features"):
        rule.step(net, x[:, 0], y)
    for name in SEQUENCE_RULES:  # an empty sequence trained the readout on the zero state; other features hit a matmul
        with pytest.raises(ValueError, match="at least one time step"):
            make_sequence_rule(name).step(net, x[:, :0], y)
        with pytest.raises(ValueError, match=f"takes {x.shape[2]} input features per time step, got {x.shape[2] + 1}"):
            make_sequence_rule(name).step(net, torch.cat([x, x[:, :, :1]], 2), y)
    with pytest.raises(ValueError, match="at least one time step"):
        net(x[:, :0])
    with pytest.raises(ValueError, match="regression targets must have shape"):
        rule.step(net, x, y[:, :1])
    with pytest.raises(ValueError, match="RecurrentNet"):
        rule.step(torch.nn.Linear(2, 2), x, y)
    with pytest.raises(ValueError, match="inject must be one of"):
        make_sequence_rule("ftp", inject="middle")
    with pytest.raises(ValueError, match="has no option"):
        make_sequence_rule("dfa", gamma=0.1)
    with pytest.raises(ValueError, match="unknown rule"):
        make_sequence_rule("bp")
    with pytest.raises(ValueError, match="unknown cell"):
        build_recurrent("lstm", 2, 4, 1)
    other = make_sequence_rule("ftp")
    other.step(build_recurrent("gru", 2, 5, 2).double(), x, y)
    with pytest.raises(ValueError, match="stored G has shape"):
        other.step(net, x, y)


@pytest.mark.parametrize("kw, message", [
    ({"outputs": 5, "horizon": 2, "channels": 3}, "horizon x channels = 2 x 3 outputs, but the readout has 5"),
    ({"outputs": 6, "horizon": 2}, "horizon x channels = 2 x 0 outputs"),
    ({"input_size": 0}, "input_size, hidden, layers and outputs must be >= 1"),
])
def test_recurrent_net_sizes_are_checked_when_built(kw, message):
    """A forecasting head whose readout is not horizon x channels was built and failed only at forecast() (a view
    error), and an input of no features built a net that ignores its input."""
    with pytest.raises(ValueError, match=message):
        build_recurrent("gru", **{"input_size": 3, "hidden": 4, "outputs": 6, **kw})


def test_gru_cell_matches_its_equations():
    torch.manual_seed(0)
    net = build_recurrent("gru", 3, 4, 1).double()
    c = net.cells[0]
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    wu, wr, wn = c.inp.weight.chunk(3)
    bu, br, bn = c.inp.bias.chunk(3)
    uu, ur = c.rec_gates.weight.chunk(2)
    u = torch.sigmoid(x @ wu.T + bu + h @ uu.T)
    r = torch.sigmoid(x @ wr.T + br + h @ ur.T)
    n = torch.tanh(x @ wn.T + bn + (r * h) @ c.rec_cand.weight.T)
    assert torch.allclose(c(x, h), u * h + (1 - u) * n)
    assert torch.allclose(c.rec_cand.weight @ c.rec_cand.weight.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
    assert isinstance(build_recurrent("elman", 3, 4, 1).cells[0], ElmanCell)


def test_mingru_cell_matches_its_equations_and_its_carry_is_its_exact_jacobian():
    """minGRU: z = sigmoid(W_z x + b_z), n = W_n x + b_n, h' = (1 - z) h + z n; dh'/dh (autograd, the full matrix)
    is diagonal and its diagonal is `carry`."""
    torch.manual_seed(0)
    c = build_recurrent("mingru", 3, 4, 1).double().cells[0]
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    wz, wn = c.inp.weight.chunk(2)
    bz, bn = c.inp.bias.chunk(2)
    z = torch.sigmoid(x @ wz.T + bz)
    assert torch.allclose(c(x, h), (1 - z) * h + z * (x @ wn.T + bn))
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda s: c(x[b:b + 1], s.unsqueeze(0))[0], h[b])
        assert torch.allclose(jac, torch.diag(c.carry(x[b:b + 1], h[b:b + 1], c(x[b:b + 1], h[b:b + 1]))[0]))


@pytest.mark.parametrize("classification", [False, True])
def test_ftp_final_on_a_mingru_is_bptt_when_its_feedback_is_the_readout(classification):
    """On an elementwise recurrence the unit's own carry is the whole path from step t to the end, so inject="final"
    credits every step exactly as BPTT does: with G set to what BPTT sends into the final state (V for
    cross-entropy, 2 V / outputs for the mean squared error) the two updates are equal. A random G is then the only
    approximation left (DFA's, in space; none in time)."""
    net, x, y = _tiny("mingru", outputs=3)
    if classification:
        y = torch.tensor([0, 2, 1, 1, 0])
    make_sequence_rule("bptt").step(net, x, y)
    exact = _grads(net)
    rule = make_sequence_rule("ftp", inject="final", gamma=0.3)
    rule.G = net.readout.weight.detach() * (1.0 if classification else 2.0 / 3)
    rule.step(net, x, y)
    for name, g in _grads(net).items():
        assert torch.allclose(g, exact[name]), name
    net, x, y = _tiny("gru", outputs=3)  # a full recurrent matrix: the diagonal carry leaves paths out
    make_sequence_rule("bptt").step(net, x, y)
    exact = _grads(net)
    rule.G = net.readout.weight.detach() * 2.0 / 3
    rule.step(net, x, y)
    assert not torch.allclose(net.cells[0].inp.weight.grad, exact["cells.0.inp.weight"])


# --- training loop, baseline, CLI -----------------------------------------------------------------------------------

@pytest.mark.parametrize("inject", ["every", "final"])
def test_ftp_learns_the_adding_problem(inject):
    """A short run (T = 10, 16 epochs of 32 batches): FTP's test MSE ends far below predicting the mean (1/6)."""
    cfg = SeqConfig(task="adding", T=10, n_train=2048, n_test=500, hidden=32, epochs=16, lr=3e-3, rule="ftp",
                    rule_options={"inject": inject})
    summary, _ = train_sequences(cfg)
    mean_mse = ((cfg.load().y_test - 1) ** 2).mean().item()
    assert summary["diverged"] is None and summary["test"]["loss"] < 0.5 * mean_mse


def test_training_is_reproducible_and_keeps_the_best_epoch():
    cfg = SeqConfig(task="order", T=20, classes=4, n_train=128, n_test=64, hidden=8, epochs=3, rule="dfa")
    a, model = train_sequences(cfg)
    b, _ = train_sequences(cfg)
    assert json.loads(json.dumps(a)) == a  # summaries go to results.json as they are
    assert a["code"] == report.code_version() and a["machine"] == report.machine()
    assert [h["val"] for h in a["history"]] == [h["val"] for h in b["history"]]
    best = min(a["history"], key=lambda h: h["val"]["loss"])
    assert a["best_epoch"] == best["epoch"] and a["test"] == best["test"] and "accuracy" in a["test"]


def test_schedules_set_each_epochs_learning_rate():
    cfg = SeqConfig(task="order", T=20, classes=4, n_train=128, n_test=64, hidden=8, epochs=4, rule="dfa", lr=0.01)
    flat, _ = train_sequences(cfg)
    cosine, _ = train_sequences(dataclasses.replace(cfg, schedule="cosine"))
    step, _ = train_sequences(dataclasses.replace(cfg, schedule="step", lr_step=3, lr_decay=0.5))
    assert [h["lr"] for h in flat["history"]] == [0.01] * 4
    assert [h["lr"] for h in cosine["history"]] == pytest.approx([0.01, 0.01 * (2 + 2 ** 0.5) / 4, 0.005,
                                                                  0.01 * (2 - 2 ** 0.5) / 4])
    assert [h["lr"] for h in step["history"]] == pytest.approx([0.01, 0.01, 0.01, 0.005])
    assert flat["history"][0]["val"] == cosine["history"][0]["val"]  # epoch 1 runs at the full rate in both
    assert flat["history"][1]["val"] != cosine["history"][1]["val"]
    assert [h["val"] for h in step["history"][:3]] == [h["val"] for h in flat["history"][:3]]
    assert step["history"][3]["val"] != flat["history"][3]["val"]
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        SeqConfig(schedule="linear")
    with pytest.raises(ValueError, match="lr_step must be >= 1"):
        SeqConfig(schedule="step", lr_step=0)


def test_linear_baseline_solves_a_linear_series():
    """A sum of two sines obeys a linear recurrence, so least squares from the look-back predicts it exactly."""
    t = torch.arange(400, dtype=torch.float64)
    series = torch.stack([torch.sin(0.3 * t) + 0.5 * torch.sin(0.05 * t), torch.cos(0.2 * t)], 1)
    data = split_and_window("sines", series, [(0, 280), (280 - 16, 320), (320 - 16, 400)], 16, 8)
    assert linear_baseline(data)["loss"] < 1e-8


def test_cli_sequences_without_timing_prints_dashes_and_valid_json(capsys, tmp_path):
    """--bench-rounds 0 (and a table without BPTT) times nothing: the columns printed 'nan', and results.json held
    NaN, which is not JSON."""
    path = tmp_path / "tiny.csv"
    _write_ett(path, 610, datetime.timedelta(days=1))
    code = cli.main(["sequences", "--task", "ett", "--csv", str(path), "--lookback", "16", "--rules", "ftp",
                     "--hidden", "4", "--epochs", "1", "--bench-rounds", "0", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| ftp |"))
    assert code == 0 and "nan" not in out and row.split(" | ")[4:6] == ["-", "-"]
    cost = json.loads((tmp_path / "o" / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))["cost"]
    assert cost["ftp"]["seconds_per_sequence"] is None and cost["ftp"]["time_to_bptt"] is None


def test_cli_sequences_prints_a_table(capsys, tmp_path):
    path = tmp_path / "tiny.csv"
    _write_ett(path, 610, datetime.timedelta(days=1))
    code = cli.main(["sequences", "--task", "ett", "--csv", str(path), "--lookback", "16", "--rules",
                     "bptt,ftp,ftp:inject=final", "--hidden", "4", "--epochs", "1", "--bench-rounds", "1",
                     "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "| ftp |" in out and "| ftp:inject=final |" in out and "| linear (least squares) |" in out
    assert "time / BPTT" in out
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["runs"]
    assert set(saved) == {"bptt", "ftp", "ftp:inject=final"}
    assert saved["ftp:inject=final"][0]["rule_options"]["inject"] == "final"
    assert saved["ftp"][0]["rule_options"]["inject"] == "every"
    assert cli.main(["sequences", "--task", "ett", "--csv", str(tmp_path / "no.csv")]) == 2
    assert "ETDataset" in capsys.readouterr().err
    assert cli.main(["sequences", "--task", "adding", "--rules", "ftp", "--rule-opt", "inject=middle"]) == 2
    assert cli.main(["sequences", "--task", "adding", "--rules", "ftp:inject"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_sequences_study_writes_tables_and_plots_and_reuses_runs(tmp_path, monkeypatch, declared_datasets):
    import ftprop.reproduce as rep
    import ftprop.study_sequences as st

    csv_path = tmp_path / "tiny.csv"
    _write_ett(csv_path, 610, datetime.timedelta(days=1))
    monkeypatch.setenv("FTPROP_ETT", str(csv_path))  # where the study's ETT comes from, and reproduce looks first
    monkeypatch.setattr(st, "SETUPS", [
        ("etth1-96", SeqConfig(task="ett", lookback=8, hidden=4, epochs=3), "goal E")])
    monkeypatch.setitem(rep.BUDGETS, "small", rep.Budget("small", epochs=1, seeds=1, bench_rounds=1))
    docs = tmp_path / "docs"
    monkeypatch.setattr(st, "RULES", ["bptt", "ftp", "dfa"])
    rep.reproduce(["sequences"], "small", tmp_path / "runs", docs)
    monkeypatch.setattr(st, "RULES", ["bptt", "ftp", "ftp:inject=final", "dfa"])  # one rule added: only it trains
    trained = []
    real_train = seqtrain.train_sequences
    monkeypatch.setattr(seqtrain, "train_sequences", lambda cfg, data: trained.append(cfg) or real_train(cfg, data))
    text = rep.reproduce(["sequences"], "small", tmp_path / "runs", docs).read_text()
    assert [(c.rule, c.rule_options) for c in trained] == [("ftp", {"inject": "final"})]
    assert text.count("| ftp |") == 1 and text.count("| ftp:inject=final |") == 1 and text.count("| dfa |") == 1
    assert "| linear (least squares) |" in text and "Goal: goal E" in text
    assert ", gru 1 x 4\n\nGoal: goal E" in text  # the heading names the net: one task may run on several cells
    assert "ftp/BPTT MSE ratio" in text and "ftp:inject=final/BPTT MSE ratio" in text
    for png in ("sequences-etth1-96.small.png", "sequences-etth1-96-forecast.small.png"):
        assert (docs / "results" / png).stat().st_size > 10_000 and f"results/{png}" in text
    real_run = st.run_sequences
    monkeypatch.setattr(st, "run_sequences", lambda *a, **k: pytest.fail("finished runs must be reused"))
    text = rep.reproduce(["sequences"], "small", tmp_path / "runs", docs).read_text()
    assert text.count("| ftp |") == 1
    assert f"code: {report.code_version()} (4 runs). " in text  # reused runs keep the code version they were made at
    (saved,) = (tmp_path / "runs").rglob("results.json")
    results = json.loads(saved.read_text())
    del results["key"]["config"]["schedule"]  # as written before SeqConfig had it: the default, so still reusable
    saved.write_text(json.dumps(results))
    clock = re.compile(r"section generated [\d-]+ \d\d:\d\d UTC|study started \d\d:\d\d")  # may tick between calls
    again = rep.reproduce(["sequences"], "small", tmp_path / "runs", docs).read_text()
    assert clock.search(text) and clock.sub("", again) == clock.sub("", text)
    results["key"]["config"]["hidden"] = 5  # a different config is retrained
    saved.write_text(json.dumps(results))
    retrained = []
    monkeypatch.setattr(st, "run_sequences", lambda *a, **k: retrained.append(a[1]) or real_run(*a, **k))
    rep.reproduce(["sequences"], "small", tmp_path / "runs", docs)
    assert retrained == [["bptt", "ftp", "ftp:inject=final", "dfa"]]


def test_subtract_last_makes_forecasts_shift_with_the_window():
    """NLinear normalisation: adding a constant per channel to the look-back adds it to every forecast step, for
    the net and for the rules' local unroll alike."""
    torch.manual_seed(0)
    net = build_recurrent("gru", 3, 5, 4 * 3, horizon=4, channels=3, subtract_last=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    moved = net.forecast(net(x + shift))
    assert torch.allclose(moved, net.forecast(net(x)) + shift)
    assert torch.allclose(local_unroll(net, x + shift)[1], net(x + shift))
    with pytest.raises(ValueError, match="forecasting heads only"):
        build_recurrent("gru", 3, 5, 1, subtract_last=True)


@pytest.mark.parametrize("frozen", ["cells.0", "cells.1", "readout"])
@pytest.mark.parametrize("name", sorted(SEQUENCE_RULES))
def test_frozen_recurrent_layer_gets_no_gradient(name, frozen):
    """A frozen layer (requires_grad False) of a stacked GRU gets no gradient and every other parameter the one it
    gets when nothing is frozen, as under autograd (FTP and DFA through time failed inside autograd before)."""
    reference, x, y = _tiny("gru", layers=2)
    net, _, _ = _tiny("gru", layers=2)
    net.get_submodule(frozen).requires_grad_(False)
    for model in (reference, net):
        make_sequence_rule(name).step(model, x, y)
    for (key, p), (_, q) in zip(net.named_parameters(), reference.named_parameters(), strict=True):
        if not p.requires_grad:
            assert p.grad is None, f"{name}: frozen {key} got a gradient"
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {key}: {m}")


@pytest.mark.parametrize("name", sorted(SEQUENCE_RULES))
def test_sequence_step_with_gradients_disabled_is_a_clear_error(name):
    net, x, y = _tiny("gru", layers=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients disabled"):
        make_sequence_rule(name).step(net, x, y)
