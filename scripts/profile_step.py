"""Where a training step's time goes, rule against rule: per-op CPU self time from torch.profiler.

    python scripts/profile_step.py --model resnet --depth 6 --batch-size 256
    python scripts/profile_step.py --model resnet --depth 6 --rules bp,ftp,ftp:inner_targets=True
    python scripts/profile_step.py --model spec --spec c32k5-relu-p2-r32z-r32z-r32z-f-l10 --batch-size 64

Builds the model (ReLU, seed 0) on random MNIST-shaped data, one thread; for each of `--repeats` rounds it runs
every rule once (warm-up), then profiles 3 of its steps, the rules alternating (one torch thread unless
`--threads`). Prints each op's per-step self
time (the minimum over rounds: the least disturbed by other jobs) and calls per step, for the `--top` costliest
ops, and the per-step totals. FTP uses G scale 0.03 (configs/ftp-conv.toml); the scale does not change the cost.
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from ftprop import runtime
from ftprop.models import build_model
from ftprop.rules import make_rule, rule_variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--spec", default=None, help="with --model spec: the model's spec string (ftprop.models)")
    ap.add_argument("--memory-format", default="contiguous", help="contiguous or channels_last (ftprop.models)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rules", default="bp,ftp")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-call", default=None, metavar="OP",
                    help="also list every call of OP (e.g. aten::convolution_backward) in the last round's profiled "
                         "steps, in order, with its input shapes' second dimension (channels) and self ms")
    args = ap.parse_args()
    runtime.keep_freed_memory()  # as the ftprop commands do: a step's time then does not depend on malloc's history
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, (1, 28, 28), 10, activation="relu", depth=args.depth, spec=args.spec,
                        memory_format=args.memory_format)
    rules = {}
    for entry in args.rules.split(","):  # NAME or NAME:KEY=VALUE:... (ftprop.rules.rule_variant)
        name, options = rule_variant(entry)
        rules[entry] = make_rule(name, **({"g_scale": 0.03} if name == "ftp" else {}) | options)
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    best = {r: collections.defaultdict(lambda: float("inf")) for r in rules}
    calls: dict[str, dict[str, int]] = {r: {} for r in rules}
    steps = 3
    per_call: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, rule in rules.items():
            rule.step(model, x, y)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.per_call is not None) as prof:
                for _ in range(steps):
                    rule.step(model, x, y)
            if args.per_call is not None:
                per_call[name] = " ".join(f"{'/'.join(str(s[1]) for s in ev.input_shapes[:2] if len(s) > 1)}:"
                                          f"{ev.self_cpu_time_total / 1e3:.2f}"
                                          for ev in prof.events() if ev.name == args.per_call)
            for ev in prof.key_averages():
                best[name][ev.key] = min(best[name][ev.key], ev.self_cpu_time_total / steps / 1e3)
                calls[name][ev.key] = ev.count // steps
    keys = sorted({k for r in rules for k in best[r]}, key=lambda k: -max(best[r].get(k, 0.0) for r in rules))
    print(f"{'op':45s}" + "".join(f" {r + ' ms':>9s} {'calls':>5s}" for r in rules))
    for k in keys[:args.top]:
        print(f"{k[:45]:45s}" + "".join(f" {best[r].get(k, 0.0):9.2f} {calls[r].get(k, 0):5d}" for r in rules))
    print(f"{'total':45s}" + "".join(f" {sum(best[r].values()):9.2f} {'':5s}" for r in rules))
    for name, line in per_call.items():
        print(f"{name} {args.per_call} per call (channels of output gradient / input: ms): {line}")


if __name__ == "__main__":
    main()
