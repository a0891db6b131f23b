"""Training throughput of 1 process (1 and 2 threads) against 2 data-parallel processes (docs/SCALING.md).

    python scripts/throughput.py --rules bp,ftp --repeats 3 --epochs 1 --batch-size 256

Runs `ftprop train` (MNIST MLP 784-1024-128-10, tanh, SGD) in each configuration, the configurations
interleaved within every repeat so that a change of load hits all of them alike, and prints a markdown table of the
median training seconds per epoch (evaluation excluded) and images per second. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {  # label -> (launcher, OMP threads per process)
    "1 process x 1 thread": ([sys.executable, "-m", "ftprop"], 1),
    "1 process x 2 threads": ([sys.executable, "-m", "ftprop"], 2),
    "2 processes x 1 thread (gloo)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2", "-m", "ftprop"], 1),
}
TRAIN_IMAGES = 55_000  # MNIST's 60,000 training images less the 5,000 held out for validation


def run(launcher: list[str], threads: int, rule: str, args: argparse.Namespace, out: Path) -> float:
    cmd = [*launcher, "train", "--rule", rule, "--hidden", "1024,128", "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads((out / "metrics.json").read_text())["seconds_per_epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default="bp,ftp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    rules = args.rules.split(",")
    seconds: dict[tuple[str, str], list[float]] = {(r, c): [] for r in rules for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for rule in rules:
                for label, (launcher, threads) in CONFIGS.items():
                    out = Path(tmp) / f"{rule}-{i}-{threads}-{len(launcher)}"
                    seconds[rule, label].append(run(launcher, threads, rule, args, out))
                    print(f"repeat {i + 1} {rule:4s} {label}: {seconds[rule, label][-1]:.2f} s/epoch", file=sys.stderr)
    print("| rule | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    for rule in rules:
        cells = []
        for label in CONFIGS:
            runs = seconds[rule, label]
            median = statistics.median(runs)
            cells.append(f"{median:.2f} s ({TRAIN_IMAGES / median:,.0f} img/s; runs {', '.join(f'{s:.2f}' for s in runs)})")
        print(f"| {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
