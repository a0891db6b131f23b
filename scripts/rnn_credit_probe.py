"""What limits recurrent FTP on ETTh1: the random projection G, or the credit each time step gets?
(docs/ALGORITHM.md, "Recurrent networks", "Temporal credit: inject='final'").

    python scripts/rnn_credit_probe.py "rule='bptt'" "" "feedback='pca'" "feedback='readout'" \
        "inject='final'" "inject='final',carry='jacobian'" "inject='final',feedback='readout'" --epochs 10

Each argument is one setting (Python keyword syntax; "" is FTP's defaults): `rule` (default ftp), any option of the
rule, and two probes that are not options of the library:
- `feedback`: what projects the output error onto the first layer. `random` (default, FTP's G), `pca` (the top 64
  principal directions of the training targets, each scaled to the norm of a column of the random G: G spans the
  outputs that actually vary) or `readout` (the readout's current weights V, so G^T = V^T: the error reaches the
  final state exactly as backprop would send it).
- `carry` (inject="final" only): `gate` (default, the GRU's update gate u, `GRUCell.carry`) or `jacobian` (the full
  diagonal of dh_t/dh_{t-1}, adding the paths through the gates and the candidate).
ETTh1 horizon 96 (or, with `--task adding --T 50`, the adding problem), GRU 1 x 64, Adam lr 1e-3, batch 64, seed 0,
one thread; prints each run's test MSE at its best validation epoch and the epoch.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses

import torch

from ftprop import seqtrain
from ftprop.recurrent import GRUCell, RecurrentNet
from ftprop.rules import FTPThroughTime, make_sequence_rule
from ftprop.sequences import SeqData


ORIGINAL_CARRY = GRUCell.carry


def jacobian_carry(self: GRUCell, x: torch.Tensor, h: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
    """diag(dh'/dh) of h' = u h + (1 - u) n: u + (h - n) du/dh + (1 - u) dn/dh, own unit's entries only."""
    H = self.hidden_size
    gx_u, gx_r, gx_n = self.inp(x).chunk(3, dim=1)
    gh_u, gh_r = self.rec_gates(h).chunk(2, dim=1)
    u, r = torch.sigmoid(gx_u + gh_u), torch.sigmoid(gx_r + gh_r)
    n = torch.tanh(gx_n + self.rec_cand(r * h))
    Uu, Ur = self.rec_gates.weight[:H].diagonal(), self.rec_gates.weight[H:].diagonal()
    Un = self.rec_cand.weight.diagonal()
    du = u * (1 - u) * Uu
    dn = (1 - n * n) * Un * (r + h * r * (1 - r) * Ur)
    return u + (h - n) * du + (1 - u) * dn


class ProbeFTP(FTPThroughTime):
    """FTPThroughTime with G replaced as the `feedback` setting says (module docstring)."""

    def __init__(self, feedback: str, data: SeqData, **options: object) -> None:
        super().__init__(**options)
        self.feedback, self.data = feedback, data

    def _projection(self, model: RecurrentNet, like: torch.Tensor) -> torch.Tensor:
        if self.feedback == "readout":
            return model.readout.weight.detach()
        if self.G is None and self.feedback == "pca":
            y = self.data.y_train.reshape(len(self.data.y_train), -1)
            _, _, v = torch.linalg.svd(y - y.mean(0), full_matrices=False)
            H = model.cells[0].hidden_size
            self.G = v[:H].T.contiguous() * (self.g_scale * y.shape[1] ** 0.5)
        return super()._projection(model, like)


def run(base: seqtrain.SeqConfig, data: SeqData, rule: str = "ftp", feedback: str = "random", carry: str = "gate",
        **options: object) -> tuple[float, int]:
    GRUCell.carry = jacobian_carry if carry == "jacobian" else ORIGINAL_CARRY
    cfg = dataclasses.replace(base, rule=rule, rule_options=options)
    make = seqtrain.make_sequence_rule
    if feedback != "random":
        seqtrain.make_sequence_rule = lambda name, **o: ProbeFTP(feedback, data, **o)
    try:
        summary, _ = seqtrain.train_sequences(cfg, data)
    finally:
        seqtrain.make_sequence_rule = make
    return summary["test"]["loss"], summary["best_epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--task", default="ett", help="ett (horizon 96) or adding (length --T)")
    ap.add_argument("--T", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = (seqtrain.SeqConfig(task="ett", horizon=96, epochs=args.epochs) if args.task == "ett" else
            seqtrain.SeqConfig(task=args.task, T=args.T, epochs=args.epochs))
    data = base.load()
    for setting in args.settings:
        kwargs = {k.arg: ast.literal_eval(k.value) for k in ast.parse(f"f({setting})").body[0].value.keywords}
        make_sequence_rule(kwargs.get("rule", "ftp"),  # fail early on a bad option
                           **{k: v for k, v in kwargs.items() if k not in ("rule", "feedback", "carry")})
        mse, epoch = run(base, data, **kwargs)
        print(f"{setting or 'ftp defaults':40s} test MSE {mse:.4f} (best validation epoch {epoch})", flush=True)


if __name__ == "__main__":
    main()
