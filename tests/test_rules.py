"""BP equals autograd; FTP's update equals its equations computed by hand; no gradient crosses a layer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ftprop import pipeline
from ftprop.models import as_net, build_model, mlp
from ftprop.rules import RULES, make_rule
from ftprop.rules.ftp import _closed_form_derivatives
from tests.conftest import tiny_batch


def tiny_net(activation: str = "tanh", seed: int = 0, hidden=(5, 4)) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = mlp(6, hidden, 3, activation).double()
    for p in net.parameters():  # nonzero biases so the formulas exercise them
        torch.nn.init.normal_(p, std=0.5)
    return net


def grads(net) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu"])
def test_bp_equals_autograd(activation):
    net = tiny_net(activation)
    x, y = tiny_batch()
    out = make_rule("bp").step(net, x, y)
    expected = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for g, e in zip(grads(net), expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(out.loss, F.cross_entropy(net(x), y))


def ftp_by_hand(net, x, y, gamma, tangent, target_nonlin="linear", update_input="h", fprime=True, G=None,
                deep_weight=1.0, G2=None):
    """FTP for a 2-hidden-layer tanh net written out with explicit matrix algebra (G2: inject="every"'s projection
    onto the second hidden layer)."""
    (W1, b1), (W2, b2), (W3, b3) = [(blk.layer.weight, blk.layer.bias) for blk in net.blocks]
    B = x.shape[0]
    with torch.no_grad():
        h1 = torch.tanh(x @ W1.T + b1)
        h2 = torch.tanh(h1 @ W2.T + b2)
        p = torch.softmax(h2 @ W3.T + b3, 1)
        Y = F.one_hot(y, 3).double()
        e = p - Y
        def contrast(G):  # s(G t_L) - s(G p)
            return -gamma * e @ G if target_nonlin == "linear" else torch.tanh((p - gamma * e) @ G) - torch.tanh(p @ G)

        t1 = h1 + contrast(G)
        t2 = torch.tanh(t1 @ W2.T + b2) + (0 if G2 is None else contrast(G2))

        def local(h, t):
            delta = h - t
            if tangent:
                delta = delta - ((delta * h).sum(1, keepdim=True) / (h * h).sum(1, keepdim=True)) * h
            return delta / gamma * ((1 - h ** 2) if fprime else 1)

        d1, d2 = local(h1, t1), deep_weight * local(h2, t2)
        in2 = h1 if update_input == "h" else t1
        return [d1.T @ x / B, d1.sum(0) / B, d2.T @ in2 / B, d2.sum(0) / B, e.T @ h2 / B, e.sum(0) / B]


@pytest.mark.parametrize("tangent", [False, True])
@pytest.mark.parametrize("target_nonlin", ["linear", "tanh"])
@pytest.mark.parametrize("update_input", ["h", "t"])
@pytest.mark.parametrize("fprime", [True, False])
def test_ftp_equals_formula(tangent, target_nonlin, update_input, fprime):
    net = tiny_net()
    x, y = tiny_batch()
    rule = make_rule("ftp", gamma=0.3, g_scale=0.7, tangent=tangent, target_nonlin=target_nonlin,
                     update_input=update_input, fprime=fprime)
    rule.step(net, x, y)
    expected = ftp_by_hand(net, x, y, 0.3, tangent, target_nonlin, update_input, fprime, rule.G)
    for g, e in zip(grads(net), expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("deep_weight", [0.0, 0.35])
@pytest.mark.parametrize("tangent", [False, True])
def test_ftp_deep_weight_scales_only_the_deeper_hidden_layers(deep_weight, tangent):
    """deep_weight weights the local losses of hidden layers 2..L-1; the first hidden layer and the output keep
    theirs."""
    net = tiny_net()
    x, y = tiny_batch()
    rule = make_rule("ftp", gamma=0.3, g_scale=0.7, tangent=tangent, deep_weight=deep_weight)
    rule.step(net, x, y)
    expected = ftp_by_hand(net, x, y, 0.3, tangent, G=rule.G, deep_weight=deep_weight)
    for g, e in zip(grads(net), expected):
        torch.testing.assert_close(g, e)
    plain = tiny_net()
    make_rule("ftp", gamma=0.3, g_scale=0.7, tangent=tangent).step(plain, x, y)
    for i, (g, p) in enumerate(zip(grads(net), grads(plain))):  # W1 b1 W2 b2 W3 b3
        torch.testing.assert_close(g, p * deep_weight if i in (2, 3) else p)


@pytest.mark.parametrize("tangent", [False, True])
@pytest.mark.parametrize("target_nonlin", ["linear", "tanh"])
@pytest.mark.parametrize("deep_weight", [1.0, 0.35])
def test_ftp_inject_every_adds_each_deeper_layers_own_projection(tangent, target_nonlin, deep_weight):
    """inject="every": the second hidden layer's target is its block applied to t_1 plus s(G_2 t_L) - s(G_2 p), with
    G_2 drawn after G from the same seeded stream (so G itself is the one inject="first" draws)."""
    net = tiny_net()
    x, y = tiny_batch()
    rule = make_rule("ftp", gamma=0.3, g_scale=0.7, tangent=tangent, target_nonlin=target_nonlin,
                     deep_weight=deep_weight, inject="every")
    rule.step(net, x, y)
    assert [tuple(g.shape) for g in rule.G_deep] == [(3, 4)]
    expected = ftp_by_hand(net, x, y, 0.3, tangent, target_nonlin, G=rule.G, deep_weight=deep_weight,
                           G2=rule.G_deep[0])
    for g, e in zip(grads(net), expected):
        torch.testing.assert_close(g, e)
    first = make_rule("ftp", gamma=0.3, g_scale=0.7)
    first.step(tiny_net(), x, y)
    assert torch.equal(first.G, rule.G) and first.G_deep is None and "G_deep" not in first.state_dict()
    gen = torch.Generator().manual_seed(0)
    torch.randn(3, 5, generator=gen)
    torch.testing.assert_close(rule.G_deep[0], torch.randn(3, 4, generator=gen).double() * 0.7)


def test_ftp_inject_every_state_round_trips_and_is_checked():
    net, (x, y) = tiny_net(), tiny_batch()
    a = make_rule("ftp", inject="every", seed=4)
    a.step(net, x, y)
    b = make_rule("ftp", inject="every", seed=9)
    b.load_state_dict(a.state_dict())
    b.step(net, x, y)
    assert torch.equal(b.G, a.G) and all(torch.equal(p, q) for p, q in zip(a.G_deep, b.G_deep))
    c = make_rule("ftp", inject="every")
    c.load_state_dict({"G": a.G})  # a checkpoint of an inject="first" run
    with pytest.raises(ValueError, match=r"stored G_deep has shapes \[\] but inject='every' on this model needs"):
        c.step(net, x, y)
    with pytest.raises(ValueError, match="inject must be one of"):
        make_rule("ftp", inject="last")


def test_ftp_gamma_multiplier_mode():
    net = tiny_net()
    x, y = tiny_batch()
    rule = make_rule("ftp", gamma=0.3, g_scale=0.7, gamma_mode="multiplier", target_nonlin="tanh", tangent=False)
    rule.step(net, x, y)
    W1, b1 = net.blocks[0].layer.weight, net.blocks[0].layer.bias
    with torch.no_grad():
        h1 = torch.tanh(x @ W1.T + b1)
        p = torch.softmax(net(x), 1)
        t1 = h1 + 0.3 * (torch.tanh(F.one_hot(y, 3).double() @ rule.G) - torch.tanh(p @ rule.G))
        d1 = (h1 - t1) / 0.3 * (1 - h1 ** 2)
    torch.testing.assert_close(W1.grad, d1.T @ x / len(y))


def test_ftp_g_is_fixed_seeded_and_restorable():
    net = tiny_net()
    x, y = tiny_batch()
    a, b = make_rule("ftp", seed=3), make_rule("ftp", seed=3)
    a.step(net, x, y)
    b.step(net, x, y)
    assert torch.equal(a.G, b.G) and a.G.shape == (3, 5)
    G0 = a.G.clone()
    a.step(net, x, y)
    assert torch.equal(a.G, G0), "G must never change"
    c = make_rule("ftp", seed=99)
    c.load_state_dict(a.state_dict())
    c.step(net, x, y)
    assert torch.equal(c.G, G0)
    uniform = make_rule("ftp", g_dist="uniform", g_scale=0.05)
    uniform.step(tiny_net(hidden=(2000, 4)), torch.randn(7, 6, dtype=torch.float64), y)
    assert uniform.G.abs().max() <= 0.05 * 3 ** 0.5 and abs(uniform.G.std().item() - 0.05) < 0.003


def _g(n_out: int, n_hidden: int, **options) -> torch.Tensor:
    return make_rule("ftp", **options)._projection(n_out, n_hidden, torch.zeros(1))


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_ftp_sparse_g_has_its_density_and_scale(density):
    G = _g(10, 2000, g_dist="sparse", g_scale=0.05, g_density=density)
    assert G.shape == (10, 2000) and int((G != 0).sum()) == round(density * G.numel())
    assert abs(G.pow(2).mean().sqrt().item() - 0.05) < 0.002  # entries' std (about zero mean) is g_scale
    assert abs(G[G != 0].std().item() - 0.05 / density ** 0.5) < 0.05 / density ** 0.5 * 0.05
    assert abs(G.mean().item()) < 0.002
    assert torch.equal(G, _g(10, 2000, g_dist="sparse", g_scale=0.05, g_density=density))  # seeded
    assert not torch.equal(G, _g(10, 2000, g_dist="sparse", g_scale=0.05, g_density=density, seed=1))


@pytest.mark.parametrize("n_out, n_hidden", [(10, 1024), (10, 6), (5, 3)])
def test_ftp_orthogonal_g_has_orthonormal_rows_at_scale(n_out, n_hidden):
    G = _g(n_out, n_hidden, g_dist="orthogonal", g_scale=0.1)
    assert G.shape == (n_out, n_hidden)
    k = max(n_out, n_hidden)
    gram = G @ G.T if n_out <= n_hidden else G.T @ G  # rows orthonormal (columns when there are more rows)
    torch.testing.assert_close(gram / (0.01 * k), torch.eye(min(n_out, n_hidden)), atol=1e-5, rtol=0)
    assert abs(G.pow(2).mean().sqrt().item() - 0.1) < 1e-5  # entries have RMS g_scale
    assert not torch.equal(G, _g(n_out, n_hidden, g_dist="orthogonal", g_scale=0.1, seed=1))


@pytest.mark.parametrize("g_dist", ["sparse", "orthogonal"])
def test_ftp_new_g_dists_train(g_dist):
    net = tiny_net()
    x, y = tiny_batch()
    make_rule("ftp", g_dist=g_dist, g_density=0.5).step(net, x, y)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("rule_name, crosses", [("bp", True), ("ftp", False)])
def test_no_gradient_crosses_a_layer(rule_name, crosses):
    """A gradient w.r.t. a block's input exists only if some rule sends error backward through that block."""
    net = tiny_net()
    x, y = tiny_batch()
    seen = []
    for blk in net.blocks:
        blk.register_full_backward_hook(lambda m, gin, gout: seen.append(gin[0] is not None))
    make_rule(rule_name).step(net, x, y)
    assert any(seen) == crosses


def test_ftp_layer_gradient_depends_only_on_its_own_target():
    """Shift the output layer's weights: the output changes, so every target changes, but layer 2's gradient
    must change only through its own target t_2 and input h_1 -- never through W_3 directly."""
    net = tiny_net()
    x, y = tiny_batch()
    rule = make_rule("ftp", tangent=False)
    rule.step(net, x, y)
    g2 = net.blocks[1].layer.weight.grad.clone()
    expected = ftp_by_hand(net, x, y, rule.gamma, False, G=rule.G)[2]
    torch.testing.assert_close(g2, expected)
    with torch.no_grad():
        net.blocks[2].layer.weight.mul_(2.0)
    rule.step(net, x, y)
    torch.testing.assert_close(net.blocks[1].layer.weight.grad, ftp_by_hand(net, x, y, rule.gamma, False, G=rule.G)[2])


def test_every_parameter_gets_a_gradient():
    for name in ("bp", "ftp"):
        net = tiny_net()
        make_rule(name).step(net, *tiny_batch())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("rule, option", [("ftp", "gamma"), ("ftp", "g_scale"), ("fa", "b_scale"), ("dfa", "b_scale"),
                                          ("drtp", "b_scale"), ("pepita", "f_scale"), ("dtp", "eta"),
                                          ("dtp", "inverse_lr")])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_positive_rule_options_must_be_finite(rule, option, value):
    """inf passed the `> 0` check (NaN gave a message without the word finite) and showed only later, as non-finite
    weights."""
    with pytest.raises(ValueError, match=f"{rule}: {option} must be > 0 and finite"):
        make_rule(rule, **{option: value})


def test_bad_rule_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        make_rule("nope")
    with pytest.raises(ValueError, match="has no option"):
        make_rule("ftp", gama=0.1)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        make_rule("ftp", gamma=0)
    with pytest.raises(ValueError, match="g_dist must be one of"):
        make_rule("ftp", g_dist="cauchy")
    for density in (0, 1.5):
        with pytest.raises(ValueError, match="g_density must be in"):
            make_rule("ftp", g_dist="sparse", g_density=density)
    with pytest.raises(ValueError, match="deep_weight must be >= 0"):
        make_rule("ftp", deep_weight=-0.5)


@pytest.mark.parametrize("weight", [float("inf"), float("nan")])
def test_ftp_refuses_a_deep_weight_that_is_not_finite(weight):
    """deep_weight = inf passed the bare `>= 0` check and gave the hidden blocks infinite (or NaN) gradients on the
    first step; it is refused where the rule is made, as an infinite gamma or g_scale is."""
    with pytest.raises(ValueError, match=f"ftp: deep_weight must be >= 0 and finite, got {weight}"):
        make_rule("ftp", deep_weight=weight)


def test_a_checkpoint_with_foreign_rule_state_is_refused():
    with pytest.raises(ValueError, match=r"ftp: unknown state keys \['B'\]"):
        make_rule("ftp").load_state_dict({"B": [torch.zeros(2, 2)]})
    with pytest.raises(ValueError, match="bp: unknown state keys .* keeps no state"):
        make_rule("bp").load_state_dict({"G": torch.zeros(2, 2)})
    g = torch.ones(3, 4)
    rule = make_rule("ftp")
    rule.load_state_dict({"G": g})
    assert rule.state_dict()["G"] is g
    with pytest.raises(ValueError, match="batch size mismatch"):
        make_rule("bp").step(tiny_net(), torch.zeros(3, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.long))



@pytest.mark.parametrize("name", list(RULES))
def test_one_hot_labels_are_refused_by_every_rule(name):
    """One-hot labels failed deep inside each rule, in torch's words for a cross-entropy (BP: "Expected floating point
    type for target with class probabilities") or, for FF, an expand; every rule now says what it wants."""
    net, x, y = tiny_net(), torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"int64 class indices of shape \(batch,\), got torch.int64 of shape "
                                         r"\(4, 3\) \(one-hot rows\? pass y.argmax\(1\)\)"):
        make_rule(name).step(net, x, F.one_hot(y, 3))
    make_rule(name).step(net, x, y)  # the labels as indices: no complaint


@pytest.mark.parametrize("name", list(RULES))
def test_a_batch_of_another_dtype_than_the_model_is_refused_by_every_rule(name):
    """float64 data into a float32 model (or the reverse) failed in the first matmul, in torch's words ("mat1 and mat2
    must have the same dtype, but got Double and Float"); every rule now names both dtypes and the casts that fix it.
    Under torch.autocast, which casts per op, the batch's dtype is the user's choice and every rule runs."""
    net, x, y = tiny_net(), torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"x is torch.float32 but the model's parameters are torch.float64: cast the "
                                         r"batch \(x.to\(torch.float64\)\) or the model \(model.to\(torch.float32\)\)"):
        make_rule(name).step(net, x.float(), y)
    with pytest.raises(ValueError, match=r"x is torch.float64 but the model's parameters are torch.float32"):
        make_rule(name).step(net.float(), x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make_rule(name).step(net, x.bfloat16(), y)
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


def test_ftp_under_autocast_gives_gradients_in_the_parameters_dtype():
    """Under torch.autocast FTP's closed-form path (Linear + pointwise activation blocks) assigned bfloat16 gradients
    to float32 weights and torch refused them ("attempting to assign a gradient with dtype 'c10::BFloat16' to a tensor
    with grad_dtype 'Float'"); autocast now takes the autograd path, whose gradients are the float32 step's up to
    bfloat16's precision (one hidden block: no difference of two passes to lose digits in)."""
    torch.manual_seed(0)
    net = mlp(6, (16,), 3, "tanh")
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    assert _closed_form_derivatives(list(net.blocks)) is not None  # the path that failed
    reference = copy.deepcopy(net)
    make_rule("ftp").step(reference, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make_rule("ftp").step(net, x, y)
    for p, q in zip(net.parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=2e-2 * q.grad.abs().max().item())

def test_ftp_relu_stays_bounded_with_tangent_and_diverges_without(small_mnist):
    """The reason `tangent` exists: plain ReLU FTP blows up on real data within a few hundred steps."""
    def run(tangent: bool) -> float:
        torch.manual_seed(0)
        net = mlp(784, (1024, 128), 10, "relu")
        rule = make_rule("ftp", tangent=tangent)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x, y = small_mnist.x_train, small_mnist.y_train
        for epoch in range(4):
            for i in range(0, len(y), 64):
                rule.step(net, x[i:i + 64], y[i:i + 64])
                opt.step()
        with torch.no_grad():
            z = net(small_mnist.x_test)
        return float((z.argmax(1) == small_mnist.y_test).float().mean()) if torch.isfinite(z).all() else 0.0

    with_tangent, without = run(tangent=True), run(tangent=False)
    assert with_tangent > 0.85, "FTP with the tangential local error should learn on ReLU"
    assert without < 0.5, "without it, ReLU FTP is expected to blow up (if this fails, update docs/ALGORITHM.md)"


def _hook_on_middle_layer(net, kind: str, calls: list) -> list:
    """Registers a hook of `kind` on the middle block's layer (its weight, for parameter hooks) that records each call
    and, where a hook can, zeroes the gradient it sees. Returns the handles to remove."""
    layer = net.blocks[1].layer
    record = lambda *args: calls.append(kind)  # noqa: E731
    if kind == "module backward":
        return [layer.register_full_backward_hook(record)]
    if kind == "module backward pre":  # the gradient at the layer's output, zeroed: the layer then learns nothing
        return [layer.register_full_backward_pre_hook(lambda m, g: (record(), (torch.zeros_like(g[0]),))[1])]
    if kind == "parameter":
        return [layer.weight.register_hook(lambda g: (record(), torch.zeros_like(g))[1])]
    if kind == "post accumulate":
        return [layer.weight.register_post_accumulate_grad_hook(lambda p: (record(), p.grad.zero_()) and None)]
    assert kind == "global module backward"
    return [torch.nn.modules.module.register_module_full_backward_hook(record)]


@pytest.mark.parametrize("kind", ["module backward", "module backward pre", "parameter", "post accumulate",
                                  "global module backward"])
def test_ftp_runs_gradient_hooks(kind):
    """A hook on gradients acts under FTP as under autograd: on an MLP FTP's local gradients have a closed form that
    assigns .grad directly, which would skip every such hook, so a hook anywhere keeps FTP on autograd. The hooks that
    can change a gradient zero the middle layer's weight gradient here; the others are counted."""
    x, y = tiny_batch()
    plain, hooked = tiny_net("relu"), tiny_net("relu")
    assert _closed_form_derivatives(list(plain.blocks)) is not None
    calls: list = []
    handles = _hook_on_middle_layer(hooked, kind, calls)
    try:
        assert _closed_form_derivatives(list(hooked.blocks)) is None
        for net in (plain, hooked):
            make_rule("ftp", gamma=0.3, g_scale=0.7).step(net, x, y)
    finally:
        for h in handles:
            h.remove()
    assert calls, f"the {kind} hook did not run under FTP"
    weight = hooked.blocks[1].layer.weight
    if kind in ("module backward pre", "parameter", "post accumulate"):
        assert torch.count_nonzero(weight.grad) == 0
        assert torch.count_nonzero(plain.blocks[1].layer.weight.grad) > 0
    else:
        for a, b in zip(grads(plain), grads(hooked)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("options", [{}, {"tangent": False}, {"fprime": False}, {"update_input": "t"},
                                     {"target_nonlin": "tanh", "gamma_mode": "multiplier"}, {"deep_weight": 0.4},
                                     {"inject": "every"}])
def test_ftp_closed_form_and_autograd_paths_agree(activation, options):
    """Plain Linear + pointwise blocks take the closed-form local gradients; a hooked (or conv, normed...) block
    takes autograd. Both must give the same update."""
    x, y = tiny_batch()
    nets = [tiny_net(activation), tiny_net(activation)]
    nets[1].blocks[1].register_forward_hook(lambda m, i, o: None)  # forces the autograd path
    assert _closed_form_derivatives(list(nets[0].blocks)) is not None
    assert _closed_form_derivatives(list(nets[1].blocks)) is None
    for net in nets:
        make_rule("ftp", gamma=0.3, g_scale=0.7, **options).step(net, x, y)
    for a, b in zip(grads(nets[0]), grads(nets[1])):
        torch.testing.assert_close(a, b)


def _small_conv_net(seed: int = 0) -> torch.nn.Module:
    """conv 3x3 (4 channels), relu, max-pool 2, flatten, dense 5 tanh, dense 3: an nn.Sequential on 1 x 8 x 8 inputs."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(36, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


CONV_RULES = ("bp", "ftp", "fa", "dfa", "drtp", "pepita")  # DTP and FF are defined for MLPs only


@pytest.mark.parametrize("frozen", ["first", "middle", "last"])
@pytest.mark.parametrize(("rule", "net_kind"), [(r, "mlp") for r in sorted(RULES)] + [(r, "conv") for r in CONV_RULES])
def test_frozen_parameters_get_no_gradient(rule, net_kind, frozen):
    """A block whose parameters are frozen (requires_grad False, as when fine-tuning part of a net on a device) gets
    no gradient, so an optimizer leaves it alone, as under autograd; every other parameter gets the gradient it gets
    when nothing is frozen. Before, FTP's closed form filled frozen weights, FF gave them zeros, and the other rules
    failed inside autograd when the first block was frozen."""
    make = (lambda: tiny_net("tanh")) if net_kind == "mlp" else _small_conv_net
    x, y = tiny_batch()
    if net_kind == "conv":
        x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference, net = as_net(make()), as_net(make())
    block = {"first": 0, "middle": 1, "last": len(net.blocks) - 1}[frozen]
    net.blocks[block].requires_grad_(False)
    for model in (reference, net):
        make_rule(rule).step(model, x, y)
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters(), strict=True):
        if not p.requires_grad:
            assert p.grad is None, f"{rule}: frozen {name} got a gradient"
        elif q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{rule}: {name}: {m}")


@pytest.mark.parametrize("rule", sorted(RULES))
def test_step_with_gradients_disabled_is_a_clear_error(rule):
    """Under torch.no_grad() some rules failed deep inside autograd and others returned with no gradient at all (a
    frozen-looking block is skipped on purpose: test_frozen_parameters_get_no_gradient); every rule now refuses."""
    x, y = tiny_batch()
    net = tiny_net()
    for context in (torch.no_grad, torch.inference_mode):
        with context(), pytest.raises(RuntimeError, match="gradients disabled"):
            make_rule(rule).step(net, x, y)
    assert all(p.grad is None for p in net.parameters())


FTP_OPTION_SETS = [{}, {"update_input": "t"}, {"fprime": False}, {"inject": "every"}, {"pipeline": True},
                   {"compare_at": "next-input", "g_block": 2}, {"inner_targets": True},
                   {"deep_weight": 0.3, "tangent": False}]


FROZEN_NETS = {"mlp": 3, "paper-cnn": 2, "resnet": 4}  # blocks: MLP 8-6, the paper CNN, a depth-4 residual CNN


@pytest.mark.parametrize(("model", "options", "frozen"), [
    (m, o, b) for m, blocks in FROZEN_NETS.items() for o in FTP_OPTION_SETS for b in range(blocks)
    if not (o.get("inner_targets") and m != "resnet") and not (o.get("g_block") and m == "mlp")])
def test_ftp_options_with_a_frozen_block(model, options, frozen):
    """Every FTP path (closed form, autograd, target-path inputs, pipelined, pooled grid, inner targets, folded loss
    weights) leaves a frozen block without gradient and the others as they are with nothing frozen."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 12, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)

    def make():
        torch.manual_seed(0)
        size = {"mlp": {"hidden": "8,6"}, "resnet": {"depth": 4}}.get(model, {})
        return as_net(build_model(model, (1, 12, 12), 3, activation="relu", **size).double())

    reference, net = make(), make()
    assert len(net.blocks) == FROZEN_NETS[model]
    net.blocks[frozen].requires_grad_(False)
    for m in (reference, net):
        rule = make_rule("ftp", **options)
        if options.get("pipeline"):
            pipeline.wire(rule, m, torch.optim.SGD(pipeline.param_groups(m), lr=0.0))
        rule.step(m, x, y)
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
        else:
            assert p.grad is None, name


def _relu_net(kind: str, inplace: bool) -> torch.nn.Sequential:
    """A small MLP or CNN of ReLUs, in place or not (same function, same initial weights)."""
    nn = torch.nn
    torch.manual_seed(0)
    if kind == "mlp":
        seq = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace), nn.Linear(5, 4), nn.ReLU(inplace), nn.Linear(4, 3))
    else:
        seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace), nn.MaxPool2d(2),
                            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace), nn.Flatten(), nn.Linear(48, 5),
                            nn.ReLU(inplace), nn.Linear(5, 3))
    return seq.double()


@pytest.mark.parametrize(("rule", "options", "kind"), [
    *[(r, {}, k) for r in sorted(RULES) for k in ("mlp", "conv") if k == "mlp" or r in CONV_RULES],
    *[("ftp", o | {"g_scale": 1.0}, k) for o in ({"update_input": "t"}, {"fprime": False},  # g_scale: targets
                                                 {"update_input": "t", "fprime": False},  # that cross ReLU's kink
                                                 {"update_input": "t", "tangent": False}) for k in ("mlp", "conv")]])
def test_in_place_activations_give_the_gradients_of_out_of_place_ones(rule, options, kind):
    """nn.ReLU(inplace=True) computes what nn.ReLU() does, so every rule's gradients are the same. Before, an in-place
    post returned the layer's output a_l itself, overwritten: PEPITA's modulated activity kept a_l's graph, so the next
    block's update reached back into block l, and FTP with fprime=False or update_input="t" differentiated at h_l
    instead of a_l. The user's inplace flags are as they were after the step."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, *((6,) if kind == "mlp" else (1, 8, 8)), generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    got = []
    for inplace in (False, True):
        seq = _relu_net(kind, inplace)
        make_rule(rule, **options).step(seq, x, y)
        assert all(m.inplace == inplace for m in seq if isinstance(m, torch.nn.ReLU))
        got.append(grads(seq))
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize(("model", "options"), [("mlp", {}), ("mlp", {"inject": "every"}),
                                                ("paper-cnn", {"compare_at": "next-input", "g_block": 2})])
def test_ftp_projections_follow_the_models_dtype(model, options):
    """G (and G_deep, and G on the pooled grid) follow the model into float64, whether the model was cast after G
    was drawn or a float32 checkpoint is loaded: converted once and kept, so the next steps copy nothing, and the
    gradients are those of a rule given G in float64. Before, the step failed in a matmul of mixed dtypes."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 12, 12, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    torch.manual_seed(0)
    net = as_net(build_model(model, (1, 12, 12), 3, activation="relu", **({"hidden": "8,6"} if model == "mlp" else {})))
    rule = make_rule("ftp", **options)
    rule.step(net, x, y)
    state = rule.state_dict()  # float32
    net = net.double()
    x = x.double()
    rule.step(net, x, y)
    G = rule.G
    assert G.dtype == torch.float64 and all(g.dtype == torch.float64 for g in rule.G_deep or [])
    rule.step(net, x, y)
    assert rule.G is G  # converted once
    if rule._grid is not None:
        assert rule._grid[0] is G and rule._grid[1].dtype == torch.float64
    got = grads(net)
    cast = {k: v.double() if torch.is_tensor(v) else [g.double() for g in v] for k, v in state.items()}
    for loaded in (state, cast):  # a float32 checkpoint, and G handed over in float64
        reference = make_rule("ftp", **options)
        reference.load_state_dict(loaded)
        reference.step(net, x, y)
        for a, b in zip(got, grads(net), strict=True):
            torch.testing.assert_close(a, b)


def test_ftp_leaky_relu_with_a_negative_slope():
    """f(a) = a for a > 0, s a otherwise, with s < 0: h = f(a) no longer tells a's sign, so the closed form (written in
    h) does not apply and torch's kernel refuses it; FTP takes autograd's path and its update is the formula's. In the
    second pass such a module is not run in place either: autograd has no backward for it (update_input="t" failed on a
    residual net)."""
    nn = torch.nn
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(-0.3), nn.Linear(5, 3)).double()
    x, y = tiny_batch()
    assert _closed_form_derivatives(list(as_net(seq).blocks)) is None
    rule = make_rule("ftp")
    rule.step(seq, x, y)
    W1, b1, W2, b2 = (p.detach() for p in seq.parameters())
    a1 = x @ W1.T + b1
    h1 = F.leaky_relu(a1, -0.3)
    e = (torch.softmax(h1 @ W2.T + b2, 1) - F.one_hot(y, 3).double()) / len(y)
    err = e @ rule.G
    err = err - (err * h1).sum(1, keepdim=True) / (h1 * h1).sum(1, keepdim=True) * h1  # tangent projection
    d1 = err * torch.where(a1 > 0, 1.0, -0.3)
    for g, expected in zip(grads(seq), [d1.T @ x, d1.sum(0), e.T @ h1, e.sum(0)], strict=True):
        torch.testing.assert_close(g, expected)

    model = build_model("spec", (1, 12, 12), 3, activation="leaky_relu", spec="c2k3-r2-r2-f-l3").double()
    for m in model.modules():
        if isinstance(m, nn.LeakyReLU):
            m.negative_slope = -0.1
    assert make_rule("ftp")._in_place_activations(list(model.blocks)) is None
    make_rule("ftp", update_input="t").step(model, torch.randn(4, 1, 12, 12, dtype=torch.float64),
                                             torch.tensor([0, 1, 2, 0]))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("options", [{}, {"update_input": "t"}, {"fprime": False}, {"norm": True}])
def test_ftp_on_a_layer_used_by_two_blocks_sums_their_local_gradients(options):
    """A Linear used twice (tied weights, from an nn.Sequential) gets the sum of its two uses' local gradients, as
    autograd gives it and as the same net with two untied copies would. The closed-form path assigned each use's
    gradient, so the layer learned from its last use only (the autograd path, with a LayerNorm, summed)."""
    norm = options.pop("norm", False)
    torch.manual_seed(0)
    first, tied, head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)
    extra = [torch.nn.LayerNorm(6)] if norm else []  # a norm with parameters: the autograd path
    copies = [copy.deepcopy(tied), copy.deepcopy(tied)]

    def net(a: torch.nn.Module, b: torch.nn.Module) -> torch.nn.Sequential:
        return torch.nn.Sequential(first, torch.nn.Tanh(), a, *extra, torch.nn.Tanh(), b, torch.nn.Tanh(), head)

    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    make_rule("ftp", **options).step(net(*copies), x, y)
    want = [copies[0].weight.grad + copies[1].weight.grad, copies[0].bias.grad + copies[1].bias.grad]
    make_rule("ftp", **options).step(net(tied, tied), x, y)
    torch.testing.assert_close([tied.weight.grad, tied.bias.grad], want)


@pytest.mark.parametrize("batch", [2, 16])  # the rank-K first conv runs at 16, not at 2 (`rank_k_pays`)
def test_stem_step_floor_script_computes_ftps_step(batch):
    """scripts/stem_step_floor.py times FTP's step on the stem residual net written out op by op without the
    library's Python (docs/ALGORITHM.md): its figure means something only while its gradients are the library's."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "stem_step_floor.py"
    spec = importlib.util.spec_from_file_location("stem_step_floor", path)
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    torch.manual_seed(0)
    net = build_model("spec", (1, 28, 28), 10, activation="relu", spec=floor.SPEC)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    rule = make_rule("ftp", **floor.OPTIONS)
    rule.step(net, x, y)
    want = [p.grad.clone() for p in net.parameters()]
    floor.floor_step(net, floor.pooled_grid(rule.G), x, y)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
