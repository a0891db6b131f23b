"""What one training step costs per rule, counted analytically: MACs, memory kept between passes, MCU latency.

Nothing here trains or times anything: the model is traced once with a one-sample input (on a copy, in eval mode)
to learn the shape every parametrised module sees, and each rule's cost is then a sum of per-module formulas that
follows the rule's definition *as implemented in ftprop/rules/*. tests/test_cost.py checks every figure against
`torch.utils.flop_counter` running the real `rule.step`.

MACs of one module, per sample (P: positions a Linear is applied at, e.g. time steps; T: sequence length)

    Linear(in, out)           forward P*in*out                    weight grad = forward, input grad = forward
    ConvNd                    forward C_out*prod(out spatial)*(C_in/groups)*prod(kernel); weight/input grad = forward
    ConvTransposeNd           forward C_in*prod(in spatial)*(C_out/groups)*prod(kernel);  weight/input grad = forward
    RNN/GRU/LSTM (g = 1/3/4)  per layer and direction, H hidden, I its input width:
                              forward T*g*H*(I+H); weight grad = forward; input grad T*g*H*I;
                              gradient through the recurrence (needed for the weight grads) (T-1)*g*H*H

torch's FLOP counter (2.13) agrees exactly for every rule except in two places it cannot see right: the weight grad of
a grouped convolution is counted as if ungrouped (groups x too many), and nn.LSTM on CPU runs a fused kernel it
counts as 0; the formulas above are the true counts there (tests/test_cost.py).

Elementwise work (nonlinearities, normalisation, softmax, biases, the optimizer, FTP's tangential projection, FF's
goodness) is not counted, as in the published MAC tables and in torch's FLOP counter.

Per block l (0-based, L blocks, hidden = 0..L-2): F_l its forward; W_l its local backward (weight grads of every
module plus the input grads of modules inside the block, which a detached block input still needs); X_l the input
grads of the modules that read the block's input (what crossing the block backward costs on top of W_l).

    bp      sum F + sum W + sum_{l>=1} X_l
    fa      as bp; the backward crossing uses a fixed B_l of W_l's shape (same MACs as X_l)
    dfa     sum F + sum W + sum_{l<L-1} n_out*|h_l|                 (e B_l for every hidden layer)
    drtp    as dfa (y B_l: the code multiplies the one-hot label; a device would just select a row of B_l)
    pepita  2 sum F + n_out*|x| (e F) + sum W                       (standard and modulated passes)
    ftp     sum F + sum W + sum_{l=1..L-2} F_l (second pass) + k*n_out*|h_0|, k = 1 (target_nonlin="linear": the
            correction -gamma G e is one projection) or 2 (tanh: s(G t_L) and s(G p)); update_input="t" adds
            sum_{l=1..L-2} F_l (the layer run again on its target, with a graph), except with closed-form local
            gradients (plain Linear blocks), which reuse the target-path input; inject="every" adds k*n_out*|h_l|
            per block l=1..L-2. What the step runs on the given model (`FTP.step_path`): on the pooled grid
            (g_block = the windows of the max-pool after block 1, compare_at="next-input") the projection is
            k*n_out*|pool(h_0)|; inner_targets leaves out of W_l the input grad of the module that reads the tapped
            activation; where `rank_k_pays` at the batch size, block 1's first op in the second pass costs
            n_out*F_op/B + n_out*|op output| (G's K = n_out rows through the op, then the B x K product) instead of
            F_op, per sample rounded to a MAC
    dtp     sum F + sum W + X_{L-1} (dCE/dh_{L-1}) + for every hidden l>=1 with inverse V_l (|h_{l-1}| x |h_l|):
            2|V_l| (g_l(t_l), g_l(h_l)) + F_l + 2|V_l| (inverse training: f_l on the noisy input, g_l forward and
            its weight grad)
    ff      2 sum_{l<L-1} (F_l + W_l) (positive and negative data through the hidden blocks; the output block is not
            used); logits="predict" adds C sum_{l<L-1} F_l

Published figures (the authors' MAC spreadsheet, FC nets 784/3072-1024-128-n) against this count, per sample:

| net | rule | published | here | diff | why |
|---|---|---|---|---|---|
| MNIST | BP | 2.003M | 2,002,688 | -0.02% | same definition: forward + weight grads + input grads of layers 2..3 |
| MNIST | FTP | 2.023M | 2,011,648 | -0.56% | ftp's default target_nonlin="linear" makes ONE projection through G (-gamma G e, 10,240 MACs); the spreadsheet counts two (s(G t_L), s(G p)): with target_nonlin="tanh" 2,021,888, -0.05% |
| MNIST | PEPITA | 2.813M | 2,813,344 | +0.01% | two forward passes + e F (10 x 784) + weight grads |
| MNIST | DTP | 2.938M | 2,526,976 | -14.0% | see below |
| MNIST | FF | 3.745M | 3,735,552 | -0.25% | see below |
| CIFAR-10 | BP / FTP(tanh) / PEPITA | 6.689M / 6.709M / 9.865M | 6,688,512 / 6,707,712 / 9,864,960 | -0.01% / -0.02% / -0.00% | as for MNIST |
| CIFAR-10 | DTP / FF | 9.967M / 13.117M | 7,212,800 / 13,107,200 | -27.6% / -0.07% | see below |
| CIFAR-100 | BP / FTP(tanh) / PEPITA | 6.723M / 6.928M / 10.176M | 6,723,072 / 6,915,072 / 10,176,000 | -0.00% / -0.19% / 0.00% | as for MNIST |
| CIFAR-100 | DTP / FF | 10.013M / 13.163M | 7,247,360 / 13,107,200 | -27.6% / -0.42% | see below |

- FTP: every published FTP figure is exactly BP + 2 n_out |h_1| (MNIST 2,002,688 + 20,480 = 2,023,168; CIFAR-100
  6,723,072 + 204,800 = 6,927,872). That counts the second pass through layer 2 at the price of BP's input grad
  through it (equal for a Linear layer) and also keeps BP's input grad of the output layer (n_out x 128). FTP never
  computes the latter (the output layer's error goes nowhere), so with two projections we are below by exactly
  n_out x 128 (1,280 on MNIST, 12,800 on CIFAR-100); with the default single projection, by n_out x |h_1| more.
- DTP: every published DTP figure is exactly BP + one more pass of forward size (MNIST 2,002,688 + 935,168 =
  2,937,856; CIFAR-10 6,688,512 + 3,278,848 = 9,967,360; CIFAR-100 10,013,440): targets propagated through learned
  inverses of ALL layers, inverse training not counted. ftprop's DTP (Lee et al. 2015 as written in rules/dtp.py)
  needs no inverse of the first layer (the input takes no target: 784 x 1024 MACs the spreadsheet counts) and
  takes the top hidden target from the output layer's own gradient, so targets cost two applications of g_2
  (2 x 131,072: g_2(t_2) and g_2(h_2)); it does count training g_2 each step (f_2 on the noisy input, g_2
  forward, its weight grad: 3 x 131,072). The difference is a different, cheaper set of inverses, not a miscount;
  for 784-1024-128 a full-inverse DTP would be 2.938M + inverse training.
- CNN (conv 5x5x32, no padding, max-pool 2, dense; the spreadsheet gives BP and FTP only): published MNIST BP 1.097M
  and FTP 1.465M, CIFAR-10 4.002M and 4.503M; here (model paper-cnn, FTP with target_nonlin="tanh") 1,059,840 and
  1,382,400 (-3.4%, -5.6%), 3,951,360 and 4,390,400 (-1.3%, -2.5%). Both published BP figures are ours plus 2 x the
  conv output size (MNIST 2 x 18,432 = 36,864 -> 1,096,704; CIFAR-10 2 x 25,088 -> 4,001,536): one operation per
  conv output in each direction for activation and pooling, elementwise work that is not a MAC and that we do not
  count. Both published FTP figures are then published BP + 2 n_out |h_1| (|h_1| = the conv map, 18,432 and
  25,088) exactly as for the FC nets: FTP - BP here is smaller by the dense layer's input grad (46,080 and 62,720)
  that FTP never computes. With those two terms added back, both FTP figures match to the last digit shown.
- FF: the published figures are within 0.15% of 4 x the full forward (MNIST 3,740,672): positive and negative
  passes and their weight grads through all three layers, plus a few thousand MACs we cannot attribute (perhaps
  the goodness, sum h^2: 4 x 1,152 on MNIST). ftprop's FF trains only the hidden layers (the output block is not
  used, as in Hinton's paper), so it is lower by 4 x n_out x 128 and counts no elementwise work.

Memory kept between passes (`bytes_kept_between_passes`): values computed in one pass that must stay stored until a
later pass consumes them, under the most frugal schedule the rule's data dependencies allow (every layer updated as
soon as its learning signal exists; f' recomputed from h_l for tanh, sigmoid and (leaky) ReLU, whose derivative is a
function of their output), times the batch size and bytes per value. Gradient accumulators, weights and transient
working buffers of one layer are not counted (they are the same for every rule or not "between passes"). The rule's
own fixed or learned matrices (G, B_l, F, DTP's inverses) are reported apart as `bytes_rule_state`.

    bp, fa, dfa, ftp, dtp   the input of every parametrised module (for its weight grad; h_0 .. h_{L-1} in an MLP),
                            every hidden output h_l that is not itself such an input (e.g. a conv map before
                            pooling: needed for f', for FTP's h_l - t_l, and for the pooling's backward), plus what a
                            post needs for its derivative when the output does not suffice (LayerNorm, GELU):
                            nothing reaches a hidden layer before the output error exists
    pepita                  x and the first-pass outputs h_1 .. h_{L-1} (each compared with the modulated pass)
    drtp                    only the output block's input: hidden layers learn from the label during the forward pass
    ff                      nothing: a layer's positive and negative terms are separable and computed within its own
                            pass

Latency on a microcontroller: MACs x cycles per MAC / clock, per sample (MCUS; the usual references, Cortex-M7 at
550 MHz with 3 cycles per MAC and Cortex-M4 at 170 MHz with 4.5). Memory traffic and elementwise work are ignored,
so these are lower bounds.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import torch
from torch import nn

from .models import Net, build_model
from .rules import RULES, Rule, make_rule
from .rules._common import require_mlp
from .rules.fa import check_layers
from .rules.ftp import StepPath, check_g_block, rank_k_pays

# Input shape (C, H, W) and number of classes of the datasets ftprop knows, so costing needs no data files.
DATASET_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}


@dataclass(frozen=True)
class MCU:
    clock_hz: float
    cycles_per_mac: float

    def latency_s(self, macs: float) -> float:
        return macs * self.cycles_per_mac / self.clock_hz


MCUS: dict[str, MCU] = {"cortex-m7": MCU(550e6, 3.0), "cortex-m4": MCU(170e6, 4.5)}

# Published MACs per training sample (the authors' spreadsheet, FC nets <input>-1024-128-<classes>; see above).
PUBLISHED_FC: dict[str, dict[str, float]] = {
    "mnist": {"bp": 2.003e6, "ftp": 2.023e6, "pepita": 2.813e6, "dtp": 2.938e6, "ff": 3.745e6},
    "cifar10": {"bp": 6.689e6, "ftp": 6.709e6, "pepita": 9.865e6, "dtp": 9.967e6, "ff": 13.117e6},
    "cifar100": {"bp": 6.723e6, "ftp": 6.928e6, "pepita": 10.176e6, "dtp": 10.013e6, "ff": 13.163e6},
}
PUBLISHED_FC_MNIST = PUBLISHED_FC["mnist"]

# Posts whose derivative is a function of their output alone (no extra storage to differentiate them).
_FREE_POSTS = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout,
               nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Parametrised modules without MACs (elementwise affine maps).
_ELEMENTWISE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


@dataclass
class ModuleCost:
    """MACs per sample of one parametrised module."""

    name: str
    kind: str
    forward: int
    weight_grad: int
    input_grad: int
    recurrence_grad: int = 0   # gradient through a recurrent layer's own hidden state (part of its weight grads)
    internal: bool = False     # its input depends on the block's own parameters
    input_numel: int = 0       # values of its input per sample (kept for its weight grad)
    output_numel: int = 0      # values of its output per sample
    weight_numel: int = 0      # size of its weight (FA's B_l has this shape)


@dataclass
class BlockCost:
    index: int
    in_numel: int                 # |h_{l-1}| per sample (after the block's `pre`, if any)
    block_in_numel: int           # the block's input as it arrives
    out_numel: int                # |h_l|
    modules: list[ModuleCost] = field(default_factory=list)
    post_extra_numel: int = 0     # values a post must keep for its derivative beyond its output
    out_extra_numel: int = 0      # |h_l| when h_l is not itself the next layer's input (e.g. pooling in between)
    out_shape: tuple[int, ...] = ()  # h_l's shape per sample (FTP's g_block needs a map it can tile)

    @property
    def forward(self) -> int:
        return sum(m.forward for m in self.modules)

    @property
    def local_backward(self) -> int:
        return sum(m.weight_grad + m.recurrence_grad + (m.input_grad if m.internal else 0) for m in self.modules)

    @property
    def input_grad(self) -> int:
        return sum(m.input_grad for m in self.modules if not m.internal)

    @property
    def kept_for_weight_grads(self) -> int:
        return sum(m.input_numel for m in self.modules)


def _module_cost(name: str, m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> ModuleCost:
    cost = _formula(name, m, inp, out)
    cost.internal = bool(inp.requires_grad)
    cost.input_numel = inp.numel()
    cost.output_numel = out.numel()
    weight = getattr(m, "weight", None)
    cost.weight_numel = weight.numel() if isinstance(weight, torch.Tensor) else 0
    return cost


def _formula(name: str, m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> ModuleCost:
    if isinstance(m, nn.Linear):
        macs = (inp.numel() // m.in_features) * m.in_features * m.out_features
        return ModuleCost(name, "linear", macs, macs, macs)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        k = math.prod(m.kernel_size)
        macs = inp.numel() * (m.out_channels // m.groups) * k  # every input value meets C_out/groups * k weights
        return ModuleCost(name, "conv_transpose", macs, macs, macs)
    if isinstance(m, nn.modules.conv._ConvNd):
        k = math.prod(m.kernel_size)
        macs = out.numel() * (m.in_channels // m.groups) * k  # C_out*H_out*W_out * C_in/groups * k*k
        return ModuleCost(name, "conv", macs, macs, macs)
    if isinstance(m, nn.RNNBase):
        if getattr(m, "proj_size", 0):
            raise NotImplementedError(f"cost: {name}: LSTM with proj_size is not costed")
        g, h, dirs = _GATES[m.mode], m.hidden_size, 2 if m.bidirectional else 1
        t = inp.shape[1] if (m.batch_first and inp.dim() == 3) else inp.shape[0]
        fwd = wgrad = igrad = rec = 0
        for layer in range(m.num_layers):
            i = m.input_size if layer == 0 else h * dirs
            fwd += dirs * t * g * h * (i + h)
            rec += dirs * (t - 1) * g * h * h
            if layer == 0:
                igrad += dirs * t * g * h * i
            else:
                rec += dirs * t * g * h * i  # inside the module: the next layer's input grad is always needed
        wgrad = fwd
        return ModuleCost(name, m.mode.lower(), fwd, wgrad, igrad, recurrence_grad=rec)
    raise NotImplementedError(f"cost: no MAC formula for {name} ({type(m).__name__})")


def _has_macs(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase))


def trace(model: Net, input_shape: Sequence[int], detach: Collection[str] = ()) -> list[BlockCost]:
    """Per block: the MACs of every parametrised module for one sample, from one traced forward on a copy.

    `detach`: names of modules whose output is passed on detached (FTP's inner targets), so that the modules reading
    it need no input grad in the block's local backward.
    """
    net = copy.deepcopy(model).eval()
    for name, m in net.named_modules():
        if name in detach:
            m.register_forward_hook(lambda mod, args, out: out.detach())
    param = next(net.parameters())
    h = net.prepare(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    blocks: list[BlockCost] = []
    for idx, block in enumerate(net.blocks):
        records: list[ModuleCost] = []
        handles = []
        for name, m in block.named_modules():
            if _has_macs(m):
                handles.append(m.register_forward_hook(
                    lambda mod, args, out, name=name: records.append(
                        _module_cost(f"blocks.{idx}.{name}", mod, args[0], out[0] if isinstance(out, tuple) else out))))
            elif list(m.parameters(recurse=False)) and not isinstance(m, _ELEMENTWISE):
                raise NotImplementedError(f"cost: no MAC formula for blocks.{idx}.{name} ({type(m).__name__})")
        pre = getattr(block, "pre", None)
        x = h.detach()
        with torch.no_grad():
            x_in = pre(x) if pre is not None else x
        try:
            with torch.enable_grad():
                a = block.layer(x_in)
                out = block.post(a)
        finally:
            for hd in handles:
                hd.remove()
        extra = 0
        if idx < len(net.blocks) - 1:
            for m in block.post.modules():
                if len(list(m.children())) == 0 and not isinstance(m, _FREE_POSTS):
                    extra = a[0].numel()  # one tensor of a_l's size covers any such post (LayerNorm, GELU)
        blocks.append(BlockCost(idx, x_in[0].numel(), x[0].numel(), out[0].numel(), records, extra,
                                out_shape=tuple(out.shape[1:])))
        h = out.detach()
    for b, nxt, block in zip(blocks[:-1], blocks[1:], list(net.blocks)[1:]):
        pre = getattr(block, "pre", None)
        reused = (pre is None or isinstance(pre, nn.Identity)) and bool(nxt.modules) \
            and not nxt.modules[0].internal and nxt.modules[0].input_numel == b.out_numel
        b.out_extra_numel = 0 if reused else b.out_numel
    return blocks


def _rule_state_numel(name: str, rule: Rule, blocks: list[BlockCost]) -> int:
    n_out, hidden = blocks[-1].out_numel, blocks[:-1]
    if name == "ftp":  # G, and with inject="every" one projection per deeper hidden block (G_deep)
        deep = sum(n_out * b.out_numel for b in hidden[1:]) if rule.inject == "every" else 0
        return n_out * blocks[0].out_numel + deep
    if name in ("dfa", "drtp"):
        return sum(n_out * b.out_numel for b in hidden)
    if name == "fa":  # a B of W's shape for every weight but the first one run (`fa.feedback_layers`)
        return sum(m.weight_numel for m in [m for b in blocks for m in b.modules][1:])
    if name == "pepita":
        return n_out * blocks[0].in_numel
    if name == "dtp":
        return sum(hidden[k - 1].out_numel * hidden[k].out_numel + hidden[k - 1].out_numel
                   for k in range(1, len(hidden)))
    return 0


def rule_cost(name: str, blocks: list[BlockCost], rule: Rule | None = None, batch_size: int = 1,
              bytes_per_value: int = 4, path: StepPath | None = None) -> dict[str, Any]:
    """MACs per sample (total and per block, by component) and memory of one rule on traced `blocks`.

    `path`: for FTP, what its step runs on the traced model (`FTP.step_path`; `model_cost` passes it, with the
    blocks traced through FTP's inner-target taps); without it, FTP's passes as its definition writes them. Block
    2's first op at rank K costs K / B of the op per sample, rounded to a MAC.
    """
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; choose one of: {', '.join(RULES)}")
    rule = rule if rule is not None else make_rule(name)
    if len(blocks) < 2 and name != "bp":
        raise ValueError(f"{name} needs at least one hidden block before the output block")
    if name in ("dtp", "ff") and any(m.kind != "linear" for b in blocks[:-1] for m in b.modules):
        raise ValueError(f"{name} runs on MLPs only (its rule refuses conv and recurrent blocks): no cost")
    L, n_out = len(blocks), blocks[-1].out_numel
    comp: list[dict[str, int]] = [{} for _ in blocks]

    def add(l: int, key: str, macs: int) -> None:
        if macs:
            comp[l][key] = comp[l].get(key, 0) + int(macs)

    if name in ("bp", "fa"):
        for l, b in enumerate(blocks):
            add(l, "forward", b.forward)
            add(l, "weight_grad", b.local_backward)
            if l >= 1:
                add(l, "input_grad" if name == "bp" else "feedback", b.input_grad)
    elif name in ("dfa", "drtp"):
        for l, b in enumerate(blocks):
            add(l, "forward", b.forward)
            add(l, "weight_grad", b.local_backward)
            if l < L - 1:
                add(l, "projection", n_out * b.out_numel)
    elif name == "pepita":
        for l, b in enumerate(blocks):
            add(l, "forward", b.forward)
            add(l, "modulated_forward", b.forward)
            add(l, "weight_grad", b.local_backward)
        add(0, "projection", n_out * blocks[0].in_numel)
    elif name == "ftp":
        path = path or StepPath(closed_form=False, grid=False, rank_k_op=None, inner_taps=())
        k = 1 if rule.target_nonlin == "linear" else 2
        for l, b in enumerate(blocks):
            add(l, "forward", b.forward)
            add(l, "weight_grad", b.local_backward)
            if 1 <= l <= L - 2:
                add(l, "second_pass", b.forward)
                if rule.update_input == "t" and not path.closed_form:
                    add(l, "update_on_target", b.forward)
                if rule.inject == "every":
                    add(l, "projection", k * n_out * b.out_numel)
        add(0, "projection", k * n_out * (blocks[1].in_numel if path.grid else blocks[0].out_numel))
        op = next((m for m in blocks[1].modules if m.name == path.rank_k_op), None) if L > 2 else None
        if op is not None and rank_k_pays(n_out, op.forward // op.output_numel, batch_size):
            # the op on G's K rows, per sample of the batch, and the B x K x |out| product, in place of the op
            comp[1]["second_pass"] -= op.forward
            add(1, "second_pass_rank_k", round(n_out * op.forward / batch_size) + n_out * op.output_numel)
    elif name == "dtp":
        for l, b in enumerate(blocks):
            add(l, "forward", b.forward)
            add(l, "weight_grad", b.local_backward)
        add(L - 1, "input_grad", blocks[-1].input_grad)
        for l in range(1, L - 1):
            v = blocks[l - 1].out_numel * blocks[l].out_numel
            add(l, "inverse_targets", 2 * v)
            add(l, "inverse_training", blocks[l].forward + 2 * v)
    elif name == "ff":
        predict = getattr(rule, "logits", "pair") == "predict"
        for l, b in enumerate(blocks[:-1]):
            add(l, "forward_pos_neg", 2 * b.forward)
            add(l, "weight_grad_pos_neg", 2 * b.local_backward)
            if predict:
                add(l, "predict", n_out * b.forward)
    else:  # a rule registered later without a cost model
        raise NotImplementedError(f"cost: no cost model for rule {name!r}")

    # Values kept between passes, per sample.
    standard = sum(b.kept_for_weight_grads + b.post_extra_numel + b.out_extra_numel for b in blocks)
    if name in ("bp", "fa", "dfa", "dtp", "ftp"):
        kept = standard
    elif name == "pepita":
        kept = sum(b.block_in_numel for b in blocks)  # x and h_1 .. h_{L-1}
    elif name == "drtp":
        kept = blocks[-1].kept_for_weight_grads
    else:  # ff
        kept = 0

    macs = sum(sum(c.values()) for c in comp)
    return {
        "macs_per_sample": macs,
        "bytes_kept_between_passes": kept * batch_size * bytes_per_value,
        "values_kept_per_sample": kept,
        "bytes_rule_state": _rule_state_numel(name, rule, blocks) * bytes_per_value,
        "latency_s": {mcu: spec.latency_s(macs) for mcu, spec in MCUS.items()},
        "layers": [{"block": l, "in": blocks[l].in_numel, "out": blocks[l].out_numel, "macs": sum(c.values()), **c}
                   for l, c in enumerate(comp)],
    }


def model_cost(model: Net, input_shape: Sequence[int], rules: dict[str, Rule] | Sequence[str], batch_size: int = 1,
               bytes_per_value: int = 4, skipped: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{rule: rule_cost(...)} for `model` on inputs of `input_shape` (one sample, without the batch dimension).

    A rule that cannot run on the model raises ValueError, or, when a dict `skipped` is given, is left out and
    recorded there with the reason.
    """
    blocks = trace(model, input_shape)
    if not isinstance(rules, dict):
        rules = {r: make_rule(r) for r in rules}
    out = {}
    for name, rule in rules.items():
        try:
            check_supported(rule, model, blocks)
            path = rule.step_path(model) if rule.name == "ftp" else None
            traced = trace(model, input_shape, path.inner_taps) if path is not None and path.inner_taps else blocks
            out[name] = rule_cost(rule.name, traced, rule, batch_size, bytes_per_value, path)
        except ValueError as err:
            if skipped is None:
                raise
            skipped[name] = str(err)
    return out


def check_supported(rule: Rule, model: Net, blocks: list[BlockCost]) -> None:
    """Raise, in the rule's own words, where its step refuses `model` (traced into `blocks`), so that no cost is given
    for a step that cannot run: DTP and FF on anything but a plain MLP, FA on a layer it has no feedback matrix for,
    FTP's g_block on a first block whose output it cannot tile."""
    if rule.name in ("dtp", "ff"):
        require_mlp(model, rule.name)
    elif rule.name == "fa":
        check_layers(model)
    elif rule.name == "ftp":
        check_g_block(rule.g_block, blocks[0].out_shape)


def cost_for(dataset: str, rules: dict[str, Rule] | Sequence[str], model: str = "mlp", hidden: str = "1024,128",
             activation: str = "tanh", norm: str = "none", batch_size: int = 1, bytes_per_value: int = 4,
             skipped: dict[str, str] | None = None, **model_kwargs: Any) -> dict[str, dict[str, Any]]:
    """The cost table the CLI prints: the named model on the named dataset's shapes (no data files needed)."""
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"cost: unknown dataset {dataset!r}; known: {', '.join(DATASET_SHAPES)}")
    if batch_size < 1:
        raise ValueError(f"cost: --batch-size must be >= 1, got {batch_size}")
    if bytes_per_value < 1:
        raise ValueError(f"cost: --bytes-per-value must be >= 1, got {bytes_per_value}")
    shape, classes = DATASET_SHAPES[dataset]
    net = build_model(model, shape, classes, hidden, activation, norm, **model_kwargs)
    return model_cost(net, shape, rules, batch_size, bytes_per_value, skipped)


def markdown(results: dict[str, dict[str, Any]], published: dict[str, float] | None = None) -> str:
    """The table `ftprop cost` prints."""
    from .report import markdown_table

    base = results.get("bp", {}).get("macs_per_sample")
    header = ["rule", "MACs / sample", "vs BP"]
    if published:
        header += ["published", "diff"]
    header += ["kept between passes", "rule state", *(f"{m} ms" for m in MCUS)]
    rows = []
    for name, r in results.items():
        macs = r["macs_per_sample"]
        row = [name, f"{macs:,}", f"{macs / base:.3f}" if base else "-"]
        if published:
            pub = published.get(name)
            row += [f"{pub / 1e6:.3f}M" if pub else "-", f"{100 * (macs / pub - 1):+.2f}%" if pub else "-"]
        row += [_bytes(r["bytes_kept_between_passes"]), _bytes(r["bytes_rule_state"]),
                *(f"{1e3 * r['latency_s'][m]:.2f}" for m in MCUS)]
        rows.append(row)
    return markdown_table(header, rows)


def layer_table(results: dict[str, dict[str, Any]]) -> str:
    from .report import markdown_table

    rows = []
    for name, r in results.items():
        for layer in r["layers"]:
            parts = ", ".join(f"{k} {v:,}" for k, v in layer.items() if k not in ("block", "in", "out", "macs"))
            rows.append([name, layer["block"], f"{layer['in']}->{layer['out']}", f"{layer['macs']:,}", parts])
    return markdown_table(["rule", "block", "shape", "MACs", "components"], rows)


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"
