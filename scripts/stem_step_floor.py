"""How fast FTP's step on the stem residual net could be with the same stock ops and no Python around them.

    python scripts/stem_step_floor.py [--batch-size 64] [--rounds 15] [--threads 2]

The stem net (`--model spec --spec c32k5-relu-p2-r32z-r32z-r32z-f-l10`, configs/ftp-paper-stem.toml) is where FTP's
step time sits on the 1.15 goal (docs/ALGORITHM.md, "The stem residual net's step time"). This script writes that
config's FTP step out by hand for this one net: every op the library's step runs (the pooled grid, the rank-K first
conv, the inner targets, the tangent projections in one kernel, the folded loss weight, the in-place ReLUs, the stem's
ReLU derivative on the pooled map), called directly on the weights, with none of the library's module calls, checks or
bookkeeping. It first checks that its
gradients equal the library's, then times BP, the library's FTP and this floor side by side (rounds of 20 steps, the
three alternating, the two FTPs in turn after BP, one SGD step each, median over rounds) and prints each one's time and its ratio to BP.

The gap between the library's FTP and the floor is what any rewrite of FTP's Python could win on this net; the gap
between the floor and BP is the work FTP's step does with stock PyTorch ops.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ftprop import runtime
from ftprop.models import build_model
from ftprop.rules import make_rule
from ftprop.rules.ftp import macs_per_output, rank_k_pays

SPEC = "c32k5-relu-p2-r32z-r32z-r32z-f-l10"
OPTIONS = dict(g_scale=0.01, g_block=2, compare_at="next-input", inner_targets=True, deep_weight=0.1)


def tangent(d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per sample, d less its component along v (`ftprop.rules._common.tangential_rows`, float32 only)."""
    rows_d, rows_v = d.flatten(1), v.flatten(1)
    g = torch.linalg.vector_norm(rows_v, dim=1, keepdim=True).clamp_min_(2 ** -20)
    return torch.ops.aten._weight_norm_interface_backward(rows_d, rows_v, g, g, 0)[0].view_as(v)


def pooled_grid(G: torch.Tensor) -> torch.Tensor:
    """G's entries one per 2 x 2 patch of the stem's 32 x 24 x 24 map (`FTP._pooled_grid`): the projection onto the
    pooled map."""
    return G.view(-1, 32, 12, 2, 12, 2)[:, :, :, 0, :, 0].reshape(G.shape[0], -1)


def floor_step(net: torch.nn.Module, G_grid: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gamma: float = 0.1,
               deep_weight: float = 0.1) -> None:
    """FTP's step with OPTIONS on the stem net, op for op as ftprop.rules.ftp.FTP runs it there (the
    rank-K first conv where it pays, as there)."""
    blocks = list(net.blocks)
    stem = blocks[0].layer
    branches = [(b.layer.branch[0], b.layer.branch[2]) for b in blocks[1:4]]
    head = blocks[4].layer
    params = [p for b in blocks for p in b.parameters()]
    for p in params:
        p.grad = None
    batch = x.shape[0]
    # first pass: each block on a detached input; the pool's positions and the inner activations kept
    a1 = stem(x)
    h1 = torch.relu(a1)
    u, idx = F.max_pool2d(h1.detach(), 2, 2, return_indices=True)
    h, outs, mids, first_out = u, [], [], None
    for i, (conv_a, conv_b) in enumerate(branches):
        a = conv_a(h)
        if i == 0:
            first_out = a.detach()
        m = torch.relu(a)
        mids.append(m)
        h = torch.relu(conv_b(m.detach()) + h)
        outs.append(h)
        h = h.detach()
    z = head(h.flatten(1))
    logp = torch.log_softmax(z.detach(), dim=1)
    p = logp.exp()
    e = p.scatter(1, y.unsqueeze(1), -1.0, reduce="add")
    with torch.no_grad():
        err0 = ((e / batch) @ G_grid).view_as(u)
        t = torch.add(u, err0, alpha=-gamma * batch)
        rank_k = rank_k_pays(e.shape[1], macs_per_output(branches[0][0]), batch)  # as the library decides
        rows = F.conv2d(G_grid.view(-1, *u.shape[1:]), branches[0][0].weight, None, 1, 1) if rank_k else None
        e0 = torch.ops.aten.threshold_backward(tangent(err0, u), u, 0)  # the ReLU's derivative on the pooled map
        e0 = torch.ops.aten.max_pool2d_with_indices_backward(e0, h1, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        roots, grads = [a1], [e0]
        for i, (conv_a, conv_b) in enumerate(branches):
            a = (torch.addmm(first_out.flatten(1), e / batch, rows.flatten(1), alpha=-gamma * batch)
                 .view_as(first_out) if i == 0 and rank_k else conv_a(t))
            m_t = torch.relu_(a)
            mid_err = tangent(m_t, mids[i].detach())
            t = torch.relu_(conv_b(m_t).add_(t))
            roots += [outs[i], mids[i]]
            grads += [tangent(t, outs[i].detach()), mid_err]
        roots.append(z)
        grads.append(e.div_(batch))
    torch.autograd.backward(roots, grads)
    torch._foreach_mul_([q.grad for b in blocks[1:4] for q in b.parameters()], -deep_weight / (gamma * batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runtime.keep_freed_memory()  # as the ftprop commands do
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("spec", (1, 28, 28), 10, activation="relu", spec=SPEC)
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    ftp, bp = make_rule("ftp", **OPTIONS), make_rule("bp")
    ftp.step(net, x, y)  # draws G
    want = [q.grad.clone() for q in net.parameters()]
    G_grid = pooled_grid(ftp.G)
    floor_step(net, G_grid, x, y)
    worst = max(((q.grad - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for q, w in zip(net.parameters(), want))
    print(f"floor's gradients against the library's: largest difference {worst:.2e} of the largest entry")
    if worst > 1e-4:
        raise SystemExit("the floor does not compute FTP's step: not timed")
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the same weights for every round
    steps = {"bp": lambda: bp.step(net, x, y), "ftp": lambda: ftp.step(net, x, y),
             "floor": lambda: floor_step(net, G_grid, x, y)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in ("bp", "ftp", "floor") if r % 2 else ("bp", "floor", "ftp"):  # neither FTP always runs first
            step = steps[name]
            for _ in range(3):
                step()
                opt.step()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
                opt.step()
            times[name].append((time.perf_counter() - t0) / 20)
    ratios = {name: statistics.median(a / b for a, b in zip(times[name], times["bp"])) for name in steps}
    print(f"batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds of 20 steps (median):")
    for name in steps:
        print(f"  {name:6s} {1e3 * statistics.median(times[name]):8.3f} ms  / BP {ratios[name]:.3f}")


if __name__ == "__main__":
    main()
