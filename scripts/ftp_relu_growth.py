"""Watch FTP's per-layer weight and activation norms on a ReLU MLP (docs/ALGORITHM.md, "ReLU, deeper layers").

    python scripts/ftp_relu_growth.py "" "g_scale=0.05" "lr=0.005" "gamma=0.01" --dataset fashion-mnist

Each argument is one setting (Python keyword syntax): `lr`, `steps` and any FTP option. 784-1024-128-10 ReLU,
SGD momentum 0.9, batch 64, seed 0, one thread, 5000 training images held out for validation; every 400 steps prints
the batch loss, each block's mean activation norm |h| (1000 validation images), each weight matrix's norm |W| and
validation accuracy.
"""
from __future__ import annotations

import argparse

import torch

from ftprop.data import load_dataset
from ftprop.models import build_model
from ftprop.rules import make_rule


def run(data, tag: str, lr: float = 0.01, steps: int = 1600, **options: object) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes, hidden="1024,128", activation="relu")
    rule = make_rule("ftp", **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    per_epoch = len(perm) // 64
    for s in range(steps):
        idx = perm[(s % per_epoch) * 64:(s % per_epoch + 1) * 64]
        out = rule.step(model, data.x_train[idx], data.y_train[idx])
        opt.step()
        if (s + 1) % 400 == 0:
            with torch.no_grad():
                h, norms = model.prepare(data.x_val[:1000]), []
                for block in model.blocks:
                    h = block(h)
                    norms.append(h.norm(dim=1).mean().item())
                acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
            print(f"{tag:28s} step {s + 1:5d} loss {out.loss.item():.3g} |h| " + " ".join(f"{n:.3g}" for n in norms)
                  + " |W| " + " ".join(f"{b.layer.weight.norm():.3g}" for b in model.blocks)
                  + f" val {100 * acc:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--dataset", default="fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, val_size=5000)
    for setting in args.settings:
        run(data, setting or "ftp defaults", **eval(f"dict({setting})"))


if __name__ == "__main__":
    main()
