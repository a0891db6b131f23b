"""Models as sequences of blocks that learning rules can walk layer by layer.

A block is one "layer" in the sense of local learning rules:

    h_l = post_l(layer_l(pre_l(h_{l-1})))

- `pre`: parameter-free operations on the block's input (pooling, flatten). They belong to the *next* block's input
  side, so that a block's output h_l is the full feature map its layer made (FTP's first target is the first conv
  map C x H x W before pooling).
- `layer`: every parametrised operation of the block (Linear or Conv2d, with the normalisation that follows it, or a
  whole residual unit branch(x) + shortcut(x)); a_l = layer(pre(h_{l-1})) is the pre-activation.
- `post`: parameter-free, shape-preserving operations on a_l (the nonlinearity, dropout, a LayerNorm without affine
  parameters): rules compare h_l and a_l element by element.

Rules that need the pre-activation a_l (for f'(a_l)) or that must run the block on a target instead of an activation
(the second pass of FTP and PEPITA) use the three parts separately; everything else just calls the block. `pre` and
`post` may not hold parameters: every parameter of a block is in `layer`, so a gradient sent into a_l reaches them all.

Models come from `build_model` (named models `mlp`, `paper-cnn`, `resnet`, or a spec string, see `spec_model`) or
from a user's nn.Sequential (`from_sequential`). `two_pass` gives the second pass of two-pass rules the first pass's
dropout masks and batch-norm statistics. See docs/ALGORITHM.md, section "Convolutional and residual networks".
"""
from __future__ import annotations

import functools
import math
import numbers
import re
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
NORMS = ("none", "layernorm")
CNN_NORMS = ("none", "batchnorm", "layernorm")  # norms of the convolutional models (paper-cnn, resnet)
MODELS = ("mlp", "paper-cnn", "resnet", "spec")
# torch: PyTorch's default; auto: xavier for tanh/sigmoid, kaiming otherwise; orthogonal: a random orthogonal matrix
# (conv: over the flattened filter) times the activation's gain, which keeps a deep tanh net's Jacobian near an
# isometry at initialisation (Saxe et al. 2014)
INITS = ("torch", "auto", "xavier", "kaiming", "orthogonal")


class Block(nn.Module):
    """`post(layer(pre(x)))`: one unit of local learning; `pre` and `post` are parameter-free."""

    def __init__(self, layer: nn.Module, post: nn.Module | None = None, pre: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.layer = layer
        self.post = post if post is not None else nn.Identity()
        for part in ("pre", "post"):
            params = [n for n, _ in getattr(self, part).named_parameters()]
            if params:
                raise ValueError(f"Block: `{part}` must be parameter-free (every parameter belongs in `layer`), "
                                 f"got parameters {params}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.layer(self.pre(x)))


class Residual(nn.Module):
    """branch(x) + shortcut(x): the parametrised part of a residual block; its activation is the block's post.

    The shortcut is the identity, or a 1x1 convolution (with its normalisation) when the shape changes.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


class Net(nn.Module):
    """A classifier made of `blocks`, applied in order; the last block's output are logits.

    `flatten_input` lets an MLP take image tensors (N, C, H, W) directly, so
    datasets keep one layout for every model.
    """

    def __init__(self, blocks: Sequence[Block], flatten_input: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.flatten_input = flatten_input

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.flatten_input else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prepare(x)
        for block in self.blocks:
            h = block(h)
        return h


def parse_hidden(hidden: str | Sequence[int]) -> tuple[int, ...]:
    """'1024,128' -> (1024, 128), with a clear error for anything else."""
    if isinstance(hidden, str):
        parts = [p.strip() for p in hidden.split(",") if p.strip()]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--hidden must be a comma-separated list of positive integers, got {hidden!r}") from None
    else:
        # integers only: int() would truncate 128.7 to 128 and read True as 1
        if not isinstance(hidden, Sequence) or any(isinstance(h, bool) or not isinstance(h, numbers.Integral)
                                                    for h in hidden):
            raise ValueError(f"hidden sizes must be a sequence of positive integers (or a string such as '1024,128'), "
                             f"got {hidden!r}")
        sizes = tuple(int(h) for h in hidden)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"--hidden must be a non-empty list of positive integers, got {hidden!r}")
    return sizes


def _init_linear(layer: nn.Linear | nn.Conv2d, activation: str, init: str) -> None:
    if init == "torch":
        return  # PyTorch's own default (kaiming_uniform with a=sqrt(5))
    if init == "auto":
        init = "xavier" if activation in ("tanh", "sigmoid") else "kaiming"
    if init == "xavier":
        gain = nn.init.calculate_gain("tanh") if activation == "tanh" else 1.0
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    elif init == "orthogonal":
        gain = nn.init.calculate_gain(activation) if activation in ("tanh", "relu", "sigmoid") else 1.0
        nn.init.orthogonal_(layer.weight, gain=gain)
    else:
        slope = 0.01 if activation == "leaky_relu" else 0.0
        nn.init.kaiming_uniform_(layer.weight, a=slope, nonlinearity="leaky_relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def mlp(in_features: int, hidden: str | Sequence[int], num_classes: int, activation: str = "tanh",
        norm: str = "none", init: str = "torch") -> Net:
    """Fully connected net in_features-hidden...-num_classes (`hidden` as `parse_hidden` reads it; empty: no hidden
    layer). Sizes are checked: a zero-width layer would build and run, and pass nothing on.

    norm='layernorm' inserts a LayerNorm without affine parameters before each
    hidden nonlinearity (a scale-invariant block; see docs/ALGORITHM.md).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    hidden = parse_hidden(hidden) if hidden else ()  # no hidden layer: a linear classifier
    for what, n in (("in_features", in_features), ("num_classes", num_classes)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"mlp: {what} must be a positive integer, got {n!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    sizes = [in_features, *hidden]
    blocks: list[Block] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layer = nn.Linear(d_in, d_out)
        _init_linear(layer, activation, init)
        post = [nn.LayerNorm(d_out, elementwise_affine=False)] if norm == "layernorm" else []
        blocks.append(Block(layer, nn.Sequential(*post, ACTIVATIONS[activation]())))
    head = nn.Linear(sizes[-1], num_classes)
    _init_linear(head, "linear", "xavier" if init == "auto" else init)
    blocks.append(Block(head))
    return Net(blocks, flatten_input=True)


# ------------------------------------------------------------------------------------------------ grouping into blocks

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)  # the operations whose weights rules train (and FA gives feedback kernels)
_WEIGHTED = (nn.Linear, nn.Conv2d, Residual)  # each starts a new block
_RESHAPE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)  # next block's pre
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.Hardtanh,
                nn.ReLU6, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
SEQUENTIAL_LAYERS = (nn.Linear, nn.Conv2d) + _RESHAPE + _NORM_LAYERS + _ELEMENTWISE  # what from_sequential accepts


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _wrap(mods: list[nn.Module], single: bool) -> nn.Module | None:
    if not mods:
        return None
    return mods[0] if single and len(mods) == 1 else nn.Sequential(*mods)


def group_blocks(items: Sequence[tuple[str, nn.Module]]) -> list[Block]:
    """Split a flat list of (label, module) into blocks; the one grouping rule of spec strings and from_sequential.

    Every Linear, Conv2d or Residual starts a block. Its `layer` runs from it through the last module with
    parameters before the next one (so conv-BatchNorm is one layer); the parameter-free modules after that form
    `post` up to the first pooling or flatten, and everything from there on is the next block's `pre`. Modules
    before the first weighted one are the first block's `pre` (they must be parameter-free); modules after the
    last are the last block's `post`.
    """
    lead: list[nn.Module] = []
    groups: list[dict[str, list[nn.Module]]] = []
    for label, m in items:
        if isinstance(m, _WEIGHTED):
            groups.append({"pre": [], "layer": [m], "tail": []})
        elif not groups:
            if _has_params(m):
                raise ValueError(f"{label}: {type(m).__name__} has parameters but comes before the first Linear or "
                                 f"Conv2d; a block's parameters must follow its Linear/Conv2d")
            lead.append(m)
        elif _has_params(m):
            g = groups[-1]
            g["layer"] += g["tail"] + [m]
            g["tail"] = []
        else:
            groups[-1]["tail"].append(m)
    if not groups:
        raise ValueError("the model has no Linear or Conv2d layer")
    groups[0]["pre"] = lead
    for g, nxt in zip(groups[:-1], groups[1:]):
        tail = g["tail"]
        cut = next((i for i, m in enumerate(tail) if isinstance(m, _RESHAPE)), len(tail))
        g["post"], nxt["pre"] = tail[:cut], tail[cut:]
    groups[-1]["post"] = groups[-1]["tail"]
    return [Block(_wrap(g["layer"], True), _wrap(g["post"], False), _wrap(g["pre"], False)) for g in groups]


def from_sequential(seq: nn.Sequential) -> Net:
    """A Net of blocks made of the modules of `seq` (shared, not copied: training the Net trains `seq`).

    Accepted: Linear, Conv2d, activations (ReLU, Tanh, Sigmoid, GELU, LeakyReLU, ELU, SiLU, Softplus, Hardtanh,
    ReLU6, Mish, Identity), MaxPool2d, AvgPool2d, AdaptiveAvg/MaxPool2d, Flatten, BatchNorm1d/2d, LayerNorm,
    GroupNorm, Dropout, and nested nn.Sequential. Anything else raises ValueError naming its type and index. The
    output of `seq` must be the logits (no final Softmax). Grouping: see `group_blocks`.
    """
    if not isinstance(seq, nn.Sequential):
        raise ValueError(f"from_sequential expects an nn.Sequential, got {type(seq).__name__}")
    items: list[tuple[str, nn.Module]] = []

    def walk(s: nn.Sequential, prefix: str) -> None:
        for i, m in enumerate(s):
            label = f"{prefix}{i}"
            if isinstance(m, nn.Sequential):
                walk(m, label + ".")
            elif type(m) in SEQUENTIAL_LAYERS:  # exact types: a subclass may compute something else
                items.append((f"layer {label}", m))
            else:
                hint = " (rules expect logits: drop the final softmax)" if isinstance(m, (nn.Softmax, nn.LogSoftmax)) \
                    else ""
                raise ValueError(f"from_sequential: unsupported layer {type(m).__name__} at index {label}{hint}; "
                                 f"supported: {', '.join(sorted({t.__name__ for t in SEQUENTIAL_LAYERS}))} and "
                                 f"nested Sequential")
            if isinstance(m, nn.MaxPool2d) and m.return_indices:
                raise ValueError(f"from_sequential: MaxPool2d at index {label} returns indices; not supported")

    walk(seq, "")
    try:
        blocks = group_blocks(items)
    except ValueError as err:
        raise ValueError(f"from_sequential: {err}") from None
    return Net(blocks)


def as_net(model: nn.Module) -> Net:
    """`model` itself if it is a Net; an nn.Sequential is converted by `from_sequential` (once, then cached while its
    list of modules is unchanged), with the train/eval mode of the wrapper modules the conversion made (the Net, its
    blocks, their containers) following the Sequential's. The user's own modules keep the modes they have: one set
    apart (a frozen BatchNorm in eval mode inside a training model) stays so, as it does under BP."""
    if isinstance(model, Net):
        return model
    if isinstance(model, nn.Sequential):
        signature = tuple(id(m) for m in model.modules())
        cached = _CONVERTED.get(model)
        if cached is None or cached[0] != signature:
            net = from_sequential(model)
            users = set(signature)
            cached = (signature, net, [m for m in net.modules() if id(m) not in users])
            _CONVERTED[model] = cached
        net, wrappers = cached[1], cached[2]
        if net.training != model.training:
            for m in wrappers:  # not net.train(): that would reset every shared module too
                m.training = model.training
        return net
    raise ValueError(f"rules take an ftprop.models.Net or an nn.Sequential of standard layers, got "
                     f"{type(model).__name__}")


# nn.Sequential -> (its modules' ids, the Net made of them, the modules that Net added around them)
_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Net, list[nn.Module]]]" = \
    weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------------- spec strings

SPEC_GRAMMAR = """\
A spec is a '-'-separated list of tokens, applied in order to the input (C, H, W):
  c<C>[k<K>][s<S>][p<P>]   Conv2d to C channels, kernel K (default 3), stride S (1), zero padding P (0)
  l<N>                     Linear to N features (needs a flat input: use f first)
  r<C>[s<S>][bn|ln|ln0][z] residual block: act(conv3x3(C, stride S) [norm] act conv3x3(C) [norm] + shortcut),
                           shortcut = identity, or conv1x1(C, stride S) [norm] when the shape changes;
                           act is the model's --activation; z: the branch's last conv starts at zero, so the
                           block starts as act(shortcut(x))
  p<K>[s<S>] / ap<K>[s<S>] max / average pooling, window K, stride S (default K)
  gap                      global average pooling and flatten: (C, H, W) -> (C,)
  f                        flatten
  bn                       batch norm (1d or 2d by the input)
  ln / ln0                 layer norm over all of a sample's features (on C x H x W maps: GroupNorm(1, C));
                           ln has affine parameters, ln0 none
  d<P> / dc<P>             dropout with probability P (e.g. d0.1); dc drops whole channels of a (C, H, W) map
                           (channel dropout, nn.Dropout2d)
  relu tanh sigmoid gelu leaky_relu (or lrelu)   activations
Example: the paper's CNN on MNIST is c32k5-relu-p2-f-l10.
Blocks: every c, l or r starts a block; norms right after it join its layer; activations and dropout are its post;
pooling and flatten open the next block's input side, so a block's output is its full feature map."""

_ACT_WORDS = {**{k: k for k in ACTIVATIONS}, "lrelu": "leaky_relu"}


def _spec_error(spec: str, i: int, tok: str, msg: str) -> ValueError:
    return ValueError(f"model spec {spec!r}: token {i + 1} {tok!r}: {msg}")


def _norm_module(kind: str, shape: tuple[int, ...]) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
    affine = kind == "ln"
    if len(shape) == 3:
        return nn.GroupNorm(1, shape[0], affine=affine)  # layer norm over C x H x W, per-channel affine
    return nn.LayerNorm(list(shape), elementwise_affine=affine)


def _out_shape(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    was = m.training
    m.eval()  # no running-statistics update, no dropout
    try:
        with torch.no_grad():
            out = m(torch.zeros(2, *shape))
    finally:
        m.train(was)
    return tuple(out.shape[1:])


def _positive(value: str | int) -> int:
    if int(value) < 1:
        raise ValueError("sizes, kernels and strides must be positive")
    return int(value)


def _int_opts(text: str, allowed: str) -> dict[str, int]:
    opts: dict[str, int] = {}
    for key, val in re.findall(r"([a-z])(\d+)", text):
        if key not in allowed or key in opts:
            raise ValueError(f"unexpected or repeated option {key!r}")
        opts[key] = int(val)
    if "".join(f"{k}{v}" for k, v in re.findall(r"([a-z])(\d+)", text)) != text:
        raise ValueError("malformed options")
    return opts


def _residual(c_in: int, c_out: int, stride: int, norm: str, activation: str, init: str,
              zero_branch: bool = False) -> Residual:
    """The parametrised part of a basic residual block: conv3x3-[norm]-act-conv3x3-[norm] + shortcut.

    `zero_branch` starts the branch's last conv at zero (Goyal et al. 2017 do it with the last norm's scale; without
    norms the conv is what can be zeroed), so each block starts as its shortcut and the net as a shallower one."""
    def conv(ci: int, co: int, k: int, s: int) -> list[nn.Module]:
        layer = nn.Conv2d(ci, co, k, s, padding=k // 2, bias=norm != "bn")
        _init_linear(layer, activation, init)
        if norm == "bn":
            return [layer, nn.BatchNorm2d(co)]
        if norm in ("ln", "ln0"):
            return [layer, nn.GroupNorm(1, co, affine=norm == "ln")]
        return [layer]

    last = conv(c_out, c_out, 3, 1)
    if zero_branch:
        nn.init.zeros_(last[0].weight)
        if last[0].bias is not None:
            nn.init.zeros_(last[0].bias)
    branch = nn.Sequential(*conv(c_in, c_out, 3, stride), ACTIVATIONS[activation](), *last)
    shortcut = nn.Sequential(*conv(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else None
    return Residual(branch, shortcut)


def spec_model(spec: str, input_shape: tuple[int, ...], num_classes: int | None = None, activation: str = "relu",
               init: str = "torch") -> Net:
    """Build a Net from a spec string (grammar: SPEC_GRAMMAR). `activation` is the one inside residual blocks and
    the one `init` uses for the gain; the output must have `num_classes` features when given."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    tokens = [t.strip() for t in spec.strip().lower().split("-")]
    if not spec.strip() or any(not t for t in tokens):
        raise ValueError(f"model spec {spec!r} is empty or has an empty token\n{SPEC_GRAMMAR}")
    weighted = [i for i, t in enumerate(tokens) if re.fullmatch(r"[clr]\d.*", t)]
    shape = tuple(int(d) for d in input_shape)
    items: list[tuple[str, nn.Module]] = []
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        head_init = "xavier" if init == "auto" else init
        gain = "linear" if weighted and i == weighted[-1] else activation
        try:
            if tok in _ACT_WORDS:
                m: nn.Module = ACTIVATIONS[_ACT_WORDS[tok]]()
            elif tok == "f":
                m = nn.Flatten()
            elif tok == "gap":
                if len(shape) != 3:  # on a flat (N, F) batch the pool would take N as a channel: it mixed samples
                    raise ValueError("global average pooling needs a (C, H, W) input")
                m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # unpacked below: both open the next block
            elif tok in ("bn", "ln", "ln0"):
                m = _norm_module(tok, shape)
            elif mt := re.fullmatch(r"d(c?)(\d*\.?\d+)", tok):
                rate = float(mt.group(2))
                if not 0 <= rate < 1:
                    raise ValueError("dropout probability must be in [0, 1)")
                if mt.group(1) and len(shape) != 3:
                    raise ValueError("channel dropout needs a (C, H, W) input")
                m = nn.Dropout2d(rate) if mt.group(1) else nn.Dropout(rate)
            elif mt := re.fullmatch(r"c(\d+)(.*)", tok):
                o = _int_opts(mt.group(2), "ksp")
                if len(shape) != 3:
                    raise ValueError("a convolution needs a (C, H, W) input")
                m = nn.Conv2d(shape[0], _positive(mt.group(1)), _positive(o.get("k", 3)), _positive(o.get("s", 1)),
                              o.get("p", 0), bias=nxt != "bn")
                _init_linear(m, gain, head_init if gain == "linear" else init)
            elif mt := re.fullmatch(r"l(\d+)", tok):
                if len(shape) != 1:
                    raise ValueError("a linear layer needs a flat input (add f before it)")
                m = nn.Linear(shape[0], _positive(mt.group(1)), bias=nxt != "bn")
                _init_linear(m, gain, head_init if gain == "linear" else init)
            elif mt := re.fullmatch(r"r(\d+)((?:s\d+)?)(bn|ln0|ln)?(z?)", tok):
                if len(shape) != 3:
                    raise ValueError("a residual block needs a (C, H, W) input")
                stride = _positive(_int_opts(mt.group(2), "s").get("s", 1))
                m = _residual(shape[0], _positive(mt.group(1)), stride, mt.group(3) or "none", activation, init,
                              zero_branch=bool(mt.group(4)))
            elif mt := re.fullmatch(r"(a?)p(\d+)(.*)", tok):
                if len(shape) != 3:
                    raise ValueError("pooling needs a (C, H, W) input")
                o = _int_opts(mt.group(3), "s")
                k = _positive(mt.group(2))
                m = (nn.AvgPool2d if mt.group(1) else nn.MaxPool2d)(k, _positive(o.get("s", k)))
            else:
                raise ValueError(f"unknown token\n{SPEC_GRAMMAR}")
            shape = _out_shape(m, shape)
        except (ValueError, RuntimeError) as err:
            raise _spec_error(spec, i, tok, f"{err} (input shape {shape})") from None
        items += [(f"token {i + 1} {tok!r}", part) for part in (m if isinstance(m, nn.Sequential) else [m])]
        if isinstance(m, Residual):  # the block's own activation after the addition
            items.append((f"token {i + 1} {tok!r}", ACTIVATIONS[activation]()))
    if num_classes is not None and shape != (num_classes,):
        raise ValueError(f"model spec {spec!r} outputs shape {shape}, but the data has {num_classes} classes: end it "
                         f"with f-l{num_classes} (or gap-l{num_classes})")
    try:
        return Net(group_blocks(items))
    except ValueError as err:
        raise ValueError(f"model spec {spec!r}: {err}") from None


# --------------------------------------------------------------------------------------------------- named models

def _norm_tokens(norm: str) -> str:
    if norm not in CNN_NORMS:
        raise ValueError(f"unknown norm {norm!r} for a convolutional model; choose one of {', '.join(CNN_NORMS)}")
    return {"none": "", "batchnorm": "-bn", "layernorm": "-ln0"}[norm]


def paper_cnn_spec(num_classes: int, activation: str = "relu", channels: int = 32, norm: str = "none") -> str:
    """The paper's CNN: conv 5x5 (no padding) with 32 channels, activation, max-pool 2, flatten, dense to classes."""
    return f"c{channels}k5{_norm_tokens(norm)}-{activation}-p2-f-l{num_classes}"


def resnet_spec(num_classes: int, depth: int = 6, activation: str = "relu", channels: int = 16,
                norm: str = "none", head_pool: bool = True) -> str:
    """A residual CNN with `depth` 3x3 conv layers (even, >= 2; 1x1 shortcuts not counted):

        stem:  conv3x3(C, pad 1) [norm] act                              full resolution: FTP's first target
        down:  conv3x3(2C, stride 2, pad 1) [norm] act
        (depth - 2) / 2 residual blocks at 2C channels: act(conv3x3 [norm] act conv3x3 [norm] + x)
        head:  max-pool 2, flatten, dense to classes (as the paper's CNN)

    Depth 2 is a plain CNN; residual blocks start at depth 4. `head_pool=False` drops the head's max-pool, so the
    dense layer reads the whole last map (2C x H/2 x W/2): the cnn study's second residual CNN, where a rule whose
    hidden blocks learn from feedback alignment (FTP, DFA) has four times the features to align its head with.
    """
    # a count of layers: 6.0 (from the Python API) failed inside range(), and True passed as an odd number
    if not (isinstance(depth, int) and not isinstance(depth, bool)) or depth < 2 or depth % 2:
        raise ValueError(f"resnet depth must be an even number >= 2 (stem conv + stride-2 conv + (depth-2)/2 residual "
                         f"blocks of two 3x3 convs), got {depth!r}")
    n = _norm_tokens(norm)
    rn = {"": "", "-bn": "bn", "-ln0": "ln0"}[n]
    res = "".join(f"-r{2 * channels}{rn}" for _ in range((depth - 2) // 2))
    pool = "-p2" if head_pool else ""
    return f"c{channels}p1{n}-{activation}-c{2 * channels}s2p1{n}-{activation}{res}{pool}-f-l{num_classes}"


def paper_cnn(input_shape: tuple[int, ...], num_classes: int, activation: str = "relu", channels: int = 32,
              norm: str = "none", init: str = "torch") -> Net:
    return spec_model(paper_cnn_spec(num_classes, activation, channels, norm), input_shape, num_classes, activation,
                      init)


def resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 6, activation: str = "relu",
           channels: int = 16, norm: str = "none", init: str = "torch") -> Net:
    return spec_model(resnet_spec(num_classes, depth, activation, channels, norm), input_shape, num_classes,
                      activation, init)


MEMORY_FORMATS = ("contiguous", "channels_last")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, hidden: str | Sequence[int] = (1024, 128),
                activation: str = "tanh", norm: str = "none", init: str = "torch", depth: int | None = None,
                spec: str | None = None, memory_format: str = "contiguous") -> Net:
    """Model factory used by the CLI and the trainer.

    mlp: --hidden sizes; paper-cnn: conv5x5x32-pool2-dense; resnet: --depth conv layers (default 6); spec: --spec.
    memory_format="channels_last" stores the conv weights, and so every feature map computed from them, as N x H x W
    x C (MLPs have none to change). Same function, other speed: on the CPU build of torch 2.13 a max-pool over a map
    in the default layout runs about 10x slower than over a channels-last one (docs/ALGORITHM.md, "Channels-last
    feature maps"). Initialisation does not depend on it; dropout masks do, as torch draws them in memory order (same
    distribution, other samples).
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; choose one of: {', '.join(MEMORY_FORMATS)}")
    net = _build(name, input_shape, num_classes, hidden, activation, norm, init, depth, spec)
    return net.to(memory_format=torch.channels_last) if memory_format == "channels_last" else net


def _build(name: str, input_shape: tuple[int, ...], num_classes: int, hidden: str | Sequence[int], activation: str,
           norm: str, init: str, depth: int | None, spec: str | None) -> Net:
    if depth is not None and name != "resnet":
        raise ValueError(f"--depth applies to --model resnet only, not {name!r}")
    if spec and name != "spec":
        raise ValueError(f"--spec needs --model spec, got --model {name!r}")
    if name == "mlp":
        return mlp(math.prod(input_shape), parse_hidden(hidden), num_classes, activation, norm, init)
    if name == "paper-cnn":
        return paper_cnn(input_shape, num_classes, activation, norm=norm, init=init)
    if name == "resnet":
        return resnet(input_shape, num_classes, 6 if depth is None else depth, activation, norm=norm, init=init)
    if name == "spec":
        if not spec:
            raise ValueError(f"--model spec needs --spec, e.g. --spec c32k5-relu-p2-f-l{num_classes}\n{SPEC_GRAMMAR}")
        if norm != "none":
            raise ValueError("--norm does not apply to --model spec: write bn, ln or ln0 tokens in the spec")
        return spec_model(spec, input_shape, num_classes, activation, init)
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


# ---------------------------------------------------------------------------------------- second-pass semantics

# The dropouts the second pass replays, with the number of dimensions of a batch they act on (0: any). Dropout1d/2d/3d
# drop whole channels: one draw per sample and channel, (N, C, 1, ...), as torch draws them.
_REPLAYED_DROPOUT = {nn.Dropout: 0, nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
_UNSUPPORTED_TWO_PASS = (nn.AlphaDropout, nn.FeatureAlphaDropout)  # their noise is not a mask
_STATEFUL = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)  # what the second pass must care about


class TwoPass:
    """The second pass of a two-pass rule evaluates the same function as the first pass, at another input.

        with two_pass(model, "ftp") as passes:
            ...first pass...             # dropout draws and records its masks; batch norm uses and records the
                                         # batch statistics and updates its running statistics, as usual
            passes.replay()
            ...second pass(es)...        # dropout applies the recorded masks; batch norm normalises with the
                                         # recorded first-pass statistics and leaves running statistics alone

    So a target or a modulated input travels through exactly the network that produced the activities it is
    compared with (same mask, same normalisation constants), per sample, and the running statistics see each batch
    once. Stock nn.Dropout, nn.Dropout1d/2d/3d (whole channels) and nn.BatchNorm* modules are handled by swapping
    their `forward` for the duration of the context (only those that draw a mask or take batch statistics in their
    present mode, `_draws`); nothing is copied and nothing remains afterwards. A module used twice in one pass that
    draws or takes batch statistics, or a stochastic module we cannot replay (AlphaDropout, FeatureAlphaDropout), is an
    error.
    """

    def __init__(self, model: nn.Module, rule: str = "") -> None:
        self.rule = rule
        self.mode = "record"
        self.masks: dict[nn.Module, torch.Tensor] = {}
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._patched: list[tuple[nn.Module, Any]] = []
        self._targets: list[tuple[nn.Module, Callable]] = []
        seen: set[int] = set()
        for m in submodules(model):
            if not isinstance(m, _STATEFUL):
                continue
            if isinstance(m, _UNSUPPORTED_TWO_PASS) and m.training and m.p > 0:
                raise ValueError(f"{rule}: {type(m).__name__} at {_names(model, m)} cannot replay its noise in the "
                                 f"second pass; use nn.Dropout or nn.Dropout2d")
            if isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, nn.modules.batchnorm._BatchNorm) \
                    and m.track_running_stats:
                raise ValueError(f"{rule}: {type(m).__name__} at {_names(model, m)} tracks running statistics; "
                                 f"not supported")
            if (type(m) in _REPLAYED_DROPOUT or isinstance(m, nn.modules.batchnorm._BatchNorm)) and _draws(m):
                if id(m) in seen:
                    raise ValueError(f"{rule}: the same {type(m).__name__} module is used at {_names(model, m)}; "
                                     f"two-pass rules need one module per use (their masks/statistics are recorded)")
                seen.add(id(m))
                self._targets.append((m, self._dropout if type(m) in _REPLAYED_DROPOUT else self._batchnorm))

    def __enter__(self) -> "TwoPass":
        for m, fn in self._targets:
            self._patched.append((m, m.__dict__.get("forward")))
            m.forward = functools.partial(fn, m)
        return self

    def replay(self) -> None:
        self.mode = "replay"

    def __exit__(self, *exc: object) -> None:
        for m, old in self._patched:
            if old is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = old
        self._patched.clear()
        self.masks.clear()
        self.stats.clear()

    def _dropout(self, m: nn.modules.dropout._DropoutNd, x: torch.Tensor) -> torch.Tensor:
        kind, dims = type(m).__name__, _REPLAYED_DROPOUT[type(m)]
        shape = (*x.shape[:2], *[1] * (x.dim() - 2)) if dims else x.shape  # channel dropout: per (sample, channel)
        if self.mode == "record":
            if m in self.masks:
                raise RuntimeError(f"{self.rule}: a {kind} module ran twice in the first pass")
            if dims and x.dim() != dims:
                raise ValueError(f"{self.rule}: {kind} drops channels of a batch with {dims} dimensions (N, C, ...), "
                                 f"got shape {tuple(x.shape)}")
            keep = 1.0 - m.p
            mask = x.new_empty(shape).bernoulli_(keep).div_(keep) if keep > 0 else x.new_zeros(shape)
            self.masks[m] = mask
        else:
            mask = self.masks.get(m)
            if mask is None or mask.shape != shape:
                raise RuntimeError(f"{self.rule}: second pass through a {kind} with no matching first-pass mask")
        return x * mask

    def _batchnorm(self, m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            if m in self.stats:
                raise RuntimeError(f"{self.rule}: a BatchNorm module ran twice in the first pass")
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
            self.stats[m] = (mean, var)
            return type(m).forward(m, x)  # batch statistics, running statistics updated once
        stats = self.stats.get(m)
        if stats is None:
            raise RuntimeError(f"{self.rule}: second pass through a BatchNorm that the first pass did not use")
        return F.batch_norm(x, stats[0], stats[1], m.weight, m.bias, False, 0.0, m.eps)


def _draws(m: nn.Module) -> bool:
    """Whether a dropout or batch-norm module depends on the batch in this mode: a dropout in training mode with p > 0
    draws a mask, a batch norm in training mode (or without running statistics) takes the batch's statistics. Any
    other is the same function in both passes and records nothing, so `TwoPass` leaves it alone (used twice too)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.training and m.p > 0
    return m.training or (m.running_mean is None and m.running_var is None)


def _names(model: nn.Module, module: nn.Module) -> str:
    return " and ".join(n for n, m in model.named_modules(remove_duplicate=False) if m is module)


def submodules(*roots: nn.Module) -> Iterator[nn.Module]:
    """Every module under `roots`, roots included (one reached twice is yielded twice): a plain walk, for checks
    made every step, where `modules()` (named_modules) would cost more than the rest of a small step's overhead."""
    stack = list(roots)
    while stack:
        m = stack.pop()
        if m is not None:  # a child slot may hold None
            yield m
            stack.extend(m._modules.values())


def two_pass(model: nn.Module, rule: str = "") -> TwoPass:
    """Context for two-pass rules (FTP, PEPITA): see TwoPass."""
    return TwoPass(model, rule)


def weight_layers(block: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d modules of a block, in registration order (a residual block: branch, then shortcut)."""
    return [m for m in block.modules() if isinstance(m, WEIGHT_LAYERS)]


def is_mlp(model: Net) -> bool:
    """Blocks of nn.Linear with parameter-free posts, no pooling, no batch norm or dropout anywhere."""
    for blk in model.blocks:
        pre = list(blk.pre) if isinstance(blk.pre, nn.Sequential) else [blk.pre]
        if not isinstance(blk.layer, nn.Linear) or not all(isinstance(m, (nn.Identity, nn.Flatten)) for m in pre):
            return False
    return not any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))
                   for m in model.modules())

