"""Watch a rule's per-layer activation and weight norms while it trains an MLP (docs/ALGORITHM.md, "ReLU, deeper
layers" and "Depth").

    python scripts/ftp_relu_growth.py "" "g_scale=0.05" "lr=0.005" "gamma=0.01" --dataset fashion-mnist
    python scripts/ftp_relu_growth.py "g_scale=0.05" "g_scale=0.05,only=(0,1)" "rule='bp'" --depth 10 --init kaiming

Each argument is one setting (Python keyword syntax): `lr`, `opt` ("sgd" with momentum 0.9, or "adam"), `steps`,
`every`, `rule` (default ftp), `only` (indices of the hidden blocks that learn; the others keep their initial
weights), `layer_scale`
(multiply every hidden block's gradient by this, e.g. 0.1 for 1/depth), `weight_tangent` (remove from each hidden
unit's weight gradient its component along that unit's weight vector), `freeze_readout` (the output layer keeps its
initial weights) and any option of the rule. The MLP is
784-1024-128-10 (or --hidden, or --depth N layers of 256) with --activation (relu), SGD momentum 0.9, batch 64, seed
0, one thread, 5000 training images held out for validation. Every `every` (400) steps, and at the step the loss
stops being finite, it prints the batch loss, each block's mean activation norm |h| (1000 validation images), each
weight matrix's norm |W| and validation accuracy.
"""
from __future__ import annotations

import argparse

import torch

from ftprop.data import load_dataset
from ftprop.models import build_model
from ftprop.rules import make_rule


def run(data, tag: str, args: argparse.Namespace, lr: float = 0.01, steps: int = 1600, every: int = 400,
        rule: str = "ftp", only: tuple[int, ...] | None = None, layer_scale: float = 1.0, weight_tangent: bool = False,
        freeze_readout: bool = False, opt: str = "sgd", **options: object) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=args.hidden, activation=args.activation,
                        init=args.init, norm=args.norm)
    learner = make_rule(rule, **options)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    per_epoch = len(perm) // 64
    hidden_blocks = model.blocks[:-1]
    for s in range(steps):
        idx = perm[(s % per_epoch) * 64:(s % per_epoch + 1) * 64]
        out = learner.step(model, data.x_train[idx], data.y_train[idx])
        if freeze_readout:
            for p in model.blocks[-1].parameters():
                p.grad = None
        for l, block in enumerate(hidden_blocks):
            for p in block.parameters():
                if only is not None and l not in only:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.mul_(layer_scale)
                    if weight_tangent and p.dim() > 1:  # drop the part along each unit's weight vector
                        w = p.detach().flatten(1)
                        g = p.grad.flatten(1)
                        g.sub_(w * ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)))
        opt.step()
        if (s + 1) % every == 0 or not torch.isfinite(out.loss):
            with torch.no_grad():
                h, norms = model.prepare(data.x_val[:1000]), []
                for block in model.blocks:
                    h = block(h)
                    norms.append(h.norm(dim=1).mean().item())
                acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
            print(f"{tag:28s} step {s + 1:5d} loss {out.loss.item():.3g} |h| " + " ".join(f"{n:.3g}" for n in norms)
                  + " |W| " + " ".join(f"{b.layer.weight.norm():.3g}" for b in model.blocks)
                  + f" val {100 * acc:.2f}", flush=True)
            if not torch.isfinite(out.loss):
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--hidden", default="1024,128", help="hidden sizes (default 1024,128)")
    ap.add_argument("--depth", type=int, help="N hidden layers of 256 (replaces --hidden)")
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--init", default="torch", help="torch, auto, xavier or kaiming (default torch)")
    ap.add_argument("--norm", default="none", help="none or layernorm (default none)")
    args = ap.parse_args()
    if args.depth:
        args.hidden = ",".join(["256"] * args.depth)
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, val_size=5000)
    for setting in args.settings:
        run(data, setting or "ftp defaults", args, **eval(f"dict({setting})"))


if __name__ == "__main__":
    main()
