"""Choose FTP's G scale for conv nets on validation accuracy (docs/ALGORITHM.md, "G's scale on a conv map").

    python scripts/tune_conv_g_scale.py "rule='bp'" "freeze=True" "g_scale=0.03" "share=True,g_scale=0.002" --steps 4000

Each argument is one setting (Python keyword syntax): `rule` (default ftp), `freeze` (keep the first block at its
initialisation; an integer N: the first N blocks; a tuple of indices: those blocks), `share` (one random G vector per
channel, broadcast over positions), `center` (G's draw less its mean over each channel's positions), `classmean`
(G's row k: the first map's mean over class-k training images at initialisation less its mean over all, averaged
over `g_block` patches, at RMS g_scale: a fixed feedback a filter bank can follow), `lr`,
`activation` (default relu), `spec` (a model spec string in place of --model), `hidden_lr` (the hidden blocks'
learning rate, when it differs from the output block's `lr`), and any FTP option. `--model paper-cnn` (default) or
`resnet` (depth 6), `--dataset` (default MNIST) with 5000 training images held out for validation, SGD momentum 0.9 (or
`optimizer='adam'`), batch 64, seed 0, one thread, a constant learning rate (`--schedule cosine`: falling to 0 over
the steps, stepped each step); prints the mean training loss, the first conv map's mean norm, the cosine between the
first block's weight update and BP's gradient on the same batch (taken every 50 steps, mean of the last 20; not with
--norm) and validation accuracy every 1000 steps (and at 600).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ftprop.data import load_dataset
from ftprop.models import build_model
from ftprop.rules import make_rule


def run(data, tag: str, steps: int, model_name: str, norm: str = "none", schedule: str = "none", rule: str = "ftp",
        lr: float = 0.01, freeze: int | tuple[int, ...] = 0, share: bool = False, center: bool = False,
        classmean: bool = False,
        optimizer: str = "sgd", activation: str = "relu", spec: str | None = None, hidden_lr: float | None = None,
        **options: object) -> None:
    torch.manual_seed(0)
    model = build_model("spec" if spec else model_name, data.input_shape, data.num_classes, activation=activation,
                        norm=norm, spec=spec)
    learner, bp = make_rule(rule, **options), make_rule("bp")
    if share:  # G constant over the positions of each channel of the first map (C x H x W)
        c, h, w = model.blocks[0](model.prepare(data.x_val[:1])).shape[1:]
        gen = torch.Generator().manual_seed(0)
        learner.G = (torch.randn(data.num_classes, c, 1, generator=gen) * learner.g_scale
                     ).expand(-1, c, h * w).reshape(data.num_classes, -1)
    if center:  # G's own draw, less its mean over the positions of each channel: no uniform push on a channel
        h1 = model.blocks[0](model.prepare(data.x_val[:1]))
        g = learner._projection(data.num_classes, h1[0].numel(), h1).view(data.num_classes, h1.shape[1], -1)
        learner.G = (g - g.mean(2, keepdim=True)).reshape(data.num_classes, -1)
    if classmean:  # no random draw: the direction that separates each class's maps at initialisation
        with torch.no_grad():
            h1 = torch.cat([model.blocks[0](model.prepare(xb)) for xb in data.x_train[:10_000].split(1000)])
        k = learner.g_block
        if k > 1:  # one value per k x k patch, as g_block's draw has
            h1 = F.avg_pool2d(h1, k)
        labels = data.y_train[:10_000]
        means = torch.stack([h1[labels == c].mean(0) for c in range(data.num_classes)])
        g = means - means.mean(0, keepdim=True)
        if k > 1:
            g = g.repeat_interleave(k, -2).repeat_interleave(k, -1)
        g = g.flatten(1)
        learner.G = g * (learner.g_scale / g.pow(2).mean().sqrt())
    still = tuple(freeze) if isinstance(freeze, tuple) else tuple(range(int(freeze)))
    frozen = tuple(f"blocks.{i}." for i in still)
    head = f"blocks.{len(model.blocks) - 1}."
    params = [{"params": [p for n, p in model.named_parameters() if not n.startswith(frozen + (head,))],
               "lr": lr if hidden_lr is None else hidden_lr},
              {"params": [p for n, p in model.named_parameters() if n.startswith(head)]}]
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    first = model.blocks[0].layer.weight
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    span = 50_000 // 64 * 64  # batches cycle through the first 50,000 images (as measured)
    t0, losses, cosines = time.time(), [], []
    for s in range(steps):
        idx = perm[(s * 64) % span:(s * 64) % span + 64]
        measure = s % 50 == 0 and norm == "none"  # BP's step would also move batch norm's running statistics
        if measure:  # BP's gradient on this batch; every rule's step clears the gradients it fills
            bp.step(model, data.x_train[idx], data.y_train[idx])
            exact = first.grad.clone()
        out = learner.step(model, data.x_train[idx], data.y_train[idx])
        if measure:
            cosines.append(F.cosine_similarity(first.grad.flatten(), exact.flatten(), 0).item())
        for block in (model.blocks[i] for i in still):
            for p in block.parameters():
                p.grad = None
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(out.loss.item())
        if (s + 1) % 1000 == 0 or s + 1 == 600:
            model.eval()
            with torch.no_grad():
                h1 = model.blocks[0](model.prepare(data.x_val[:500]))
                acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
            model.train()
            recent = losses[-min(len(losses), 1000):]
            print(f"{tag:32s} step {s + 1:5d} loss {sum(recent) / len(recent):.3f} "
                  f"|h1| {h1.flatten(1).norm(dim=1).mean():7.1f} cos {sum(cosines[-20:]) / max(1, len(cosines[-20:])):+.2f} "
                  f"val {100 * acc:.2f} ({time.time() - t0:.0f}s)",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--model", default="paper-cnn", help="paper-cnn or resnet (depth 6)")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--norm", default="none", help="none, batchnorm or layernorm after each conv")
    ap.add_argument("--schedule", default="none", help="none or cosine")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, val_size=5000)
    for setting in args.settings:
        run(data, setting or "ftp defaults", args.steps, args.model, args.norm, args.schedule, **eval(f"dict({setting})"))


if __name__ == "__main__":
    main()
