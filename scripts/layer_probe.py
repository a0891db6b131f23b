"""How much of the label each hidden layer of a trained MLP holds: a linear read-out fitted per layer (docs/ALGORITHM.md,
"Depth").

    python scripts/layer_probe.py results/runs/full/depth-headline-mnist-mlp10-adam/{bp,ftp}-seed0

Each argument is a run directory written by `ftprop train` (config.json and checkpoint.pt; checkpoints are not
versioned, so train the run first). For the input and every hidden block's output, a ridge regression to the one-hot
label (closed form, float64, penalty --ridge) is fitted on the first --n-train images of the run's own training split
and scored on the test set; it prints both accuracies per layer. A layer the rule trained well makes the classes more
linearly separable than the layer below it; a read-out that is separable on training images only is memorising.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ftprop.data import load_dataset
from ftprop.models import build_model


def hidden_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input (flattened) and each hidden block's output, in eval mode."""
    h = model.prepare(x)
    outs = [h.flatten(1)]
    model.eval()
    with torch.no_grad():
        for block in model.blocks[:-1]:
            h = block(h)
            outs.append(h.flatten(1))
    return outs


def ridge_readout(f_train: torch.Tensor, y_train: torch.Tensor, penalty: float, num_classes: int) -> torch.Tensor:
    """Weights (features + 1, classes) of the least-squares map to one-hot labels, with an L2 penalty."""
    a = torch.cat([f_train, torch.ones(len(f_train), 1)], 1).double()
    target = torch.nn.functional.one_hot(y_train, num_classes).double()
    return torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1], dtype=torch.float64), a.T @ target)


def accuracy(w: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> float:
    scores = torch.cat([f, torch.ones(len(f), 1)], 1).double() @ w
    return 100 * (scores.argmax(1) == y).double().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (config.json, checkpoint.pt)")
    p.add_argument("--n-train", type=int, default=20000, help="training images the read-outs are fitted on")
    p.add_argument("--ridge", type=float, default=0.1, help="L2 penalty of the read-outs")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = None
    for run in map(Path, args.runs):
        cfg = json.loads((run / "config.json").read_text())
        if data is None or (data.name, len(data.y_val)) != (cfg["dataset"], cfg["val_size"]):
            data = load_dataset(cfg["dataset"], cfg["data_dir"], val_size=cfg["val_size"])
        model = build_model(cfg["model"], data.input_shape, data.num_classes, cfg["hidden"], cfg["activation"],
                            cfg["norm"], cfg["init"], depth=cfg["depth"], spec=cfg["spec"])
        ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        x, y = data.x_train[:args.n_train], data.y_train[:args.n_train]
        test, train = [], []
        for f_train, f_test in zip(hidden_outputs(model, x), hidden_outputs(model, data.x_test)):
            w = ridge_readout(f_train, y, args.ridge, data.num_classes)
            test.append(accuracy(w, f_test, data.y_test))
            train.append(accuracy(w, f_train, y))
        print(f"{run}  (epoch {ckpt['epoch']})")
        print("  layer        " + " ".join(f"{'input' if i == 0 else i:>6}" for i in range(len(test))))
        print("  test  %      " + " ".join(f"{a:6.2f}" for a in test))
        print("  train %      " + " ".join(f"{a:6.2f}" for a in train))


if __name__ == "__main__":
    main()
