"""Sequence tasks as in-memory tensors: two synthetic long-term-dependency problems and real forecasting series.

Every task is a `SeqData`: inputs (N, T, d_in) float32 and targets, class indices (N,) int64 for classification or
flattened forecasts (N, horizon * channels) float32 for regression, for a train, validation and test split. Batches
are slices of an index permutation, as for the image datasets (ftprop/data.py).

- `adding_problem` (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015 and Arjovsky et al. 2016): two input
  channels, values U(0, 1) and a marker channel with exactly two 1s, one in each half of the sequence; the target is the
  sum of the two marked values. Predicting the mean (1) scores MSE var(U + U) = 1/6.
- `temporal_order` (Hochreiter & Schmidhuber 1997, tasks 6a and 6b): a one-hot symbol sequence from {a, b, c, d, X, Y,
  B, E}, B first and E last, distractors a-d elsewhere, and 2 (4 classes) or 3 (8 classes) relevant symbols X/Y at
  positions drawn from fixed windows of the sequence; the class is the X/Y order (X = 0, Y = 1, earliest symbol most
  significant). Windows scale the paper's with T/100: [0.1T, 0.2T] and [0.5T, 0.6T]; 8 classes: [0.1T, 0.2T],
  [0.33T, 0.43T], [0.66T, 0.76T].
- `load_ett`: any ETT-format CSV (`date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT`, Zhou et al. 2021) with the standard
  protocol of the Informer/Autoformer/DLinear code: chronological split 12/4/4 months (30-day months), the validation
  and test windows start `lookback` rows before their split so that every target row belongs to its split, z-score
  with the training rows' mean and std, look-back 96, horizons 96/192/336/720; errors are measured on the normalised
  values.
- `load_statsmodels_series`: real series that ship inside the statsmodels wheel, read as plain CSV without importing
  statsmodels (so scipy and pandas are not needed): `sunspots` (yearly 1700-2008) and `co2` (weekly Mauna Loa
  1958-2001, its 59 missing weeks filled by linear interpolation). Split chronologically 70/10/20 (the protocol of
  the same code for non-ETT series) with the same windowing and z-scoring.
"""
from __future__ import annotations

import csv
import datetime
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DatasetError

ETT_COLUMNS = ("date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
ETT_HORIZONS = (96, 192, 336, 720)
ETT_ENV = "FTPROP_ETT"  # path of an ETT-format CSV, used when no path is given
DEFAULT_ETT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ett" / "ETTh1.csv"
DATA_SEEDS = {"train": 0, "val": 1, "test": 2}  # synthetic splits: the same data for every run, disjoint streams


@dataclass
class SeqData:
    """A sequence task: x (N, T, d_in); y (N,) int64 classes or (N, horizon * channels) float32 forecasts."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_outputs: int                 # classes, or horizon * channels
    classification: bool
    horizon: int = 0                 # forecasting only: steps ahead and channels per step (y viewed as (N, h, c))
    channels: int = 0

    @property
    def input_size(self) -> int:
        return self.x_train.shape[2]


# --- synthetic long-term-dependency problems --------------------------------------------------------------------

def adding_problem(n: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, T, 2), y (n, 1)): channel 0 values U(0, 1), channel 1 a marker with one 1 in each half; y the marked sum."""
    if T < 2:
        raise ValueError(f"adding problem: T must be >= 2, got {T}")
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(n, T, generator=gen)
    half = T // 2
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, T, (n,), generator=gen)
    marker = torch.zeros(n, T)
    rows = torch.arange(n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    return torch.stack([values, marker], dim=2), (values * marker).sum(1, keepdim=True)


ORDER_SYMBOLS = ("a", "b", "c", "d", "X", "Y", "B", "E")
ORDER_WINDOWS = {4: ((0.10, 0.20), (0.50, 0.60)), 8: ((0.10, 0.20), (0.33, 0.43), (0.66, 0.76))}


def temporal_order(n: int, T: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, T, 8) one-hot symbols, y (n,) class of the X/Y order); see the module docstring for the definition."""
    if classes not in ORDER_WINDOWS:
        raise ValueError(f"temporal order: classes must be 4 or 8, got {classes}")
    windows = [(round(lo * T), round(hi * T)) for lo, hi in ORDER_WINDOWS[classes]]
    if windows[0][0] < 1 or windows[-1][1] > T - 2 or any(a[1] >= b[0] for a, b in zip(windows, windows[1:])):
        raise ValueError(f"temporal order: T = {T} is too short for {classes} classes (its position windows overlap)")
    gen = torch.Generator().manual_seed(seed)
    symbols = torch.randint(0, 4, (n, T), generator=gen)  # distractors a-d
    symbols[:, 0], symbols[:, -1] = ORDER_SYMBOLS.index("B"), ORDER_SYMBOLS.index("E")
    y = torch.zeros(n, dtype=torch.int64)
    rows = torch.arange(n)
    for lo, hi in windows:
        pos = torch.randint(lo, hi + 1, (n,), generator=gen)
        bit = torch.randint(0, 2, (n,), generator=gen)
        symbols[rows, pos] = ORDER_SYMBOLS.index("X") + bit
        y = 2 * y + bit
    return torch.nn.functional.one_hot(symbols, len(ORDER_SYMBOLS)).float(), y


def synthetic(task: str, T: int, n_train: int, n_test: int, classes: int = 4) -> SeqData:
    """The adding or temporal-order problem with fixed data seeds (DATA_SEEDS); validation as large as the test set."""
    sizes = {"train": n_train, "val": n_test, "test": n_test}
    if task == "adding":
        splits = {k: adding_problem(n, T, DATA_SEEDS[k]) for k, n in sizes.items()}
        outputs, classification = 1, False
    elif task == "order":
        splits = {k: temporal_order(n, T, classes, DATA_SEEDS[k]) for k, n in sizes.items()}
        outputs, classification = classes, True
    else:
        raise ValueError(f"unknown synthetic task {task!r}; choose adding or order")
    name = f"{task} T={T}" + (f", {classes} classes" if task == "order" else "")
    return SeqData(name, *splits["train"], *splits["val"], *splits["test"], outputs, classification)


# --- real series --------------------------------------------------------------------------------------------------

def windows(series: torch.Tensor, lookback: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of a (rows, channels) series: x (N, lookback, channels), y (N, horizon * channels),
    N = rows - lookback - horizon + 1. Views into `series` where possible; batches gather rows from them."""
    n = series.shape[0] - lookback - horizon + 1
    if n < 1:
        raise ValueError(f"a split of {series.shape[0]} rows is too short for look-back {lookback} + horizon {horizon}")
    span = series.unfold(0, lookback + horizon, 1).transpose(1, 2)  # (N, lookback + horizon, channels)
    return span[:, :lookback], span[:, lookback:].reshape(n, -1)


def split_and_window(name: str, series: torch.Tensor, borders: list[tuple[int, int]], lookback: int,
                     horizon: int) -> SeqData:
    """Z-score `series` with the statistics of its training rows (borders[0]) and window each split."""
    train = series[borders[0][0]:borders[0][1]]
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    normed = ((series - mean) / std).float()
    parts = [windows(normed[a:b], lookback, horizon) for a, b in borders]
    channels = series.shape[1]
    return SeqData(name, *parts[0], *parts[1], *parts[2], horizon * channels, False, horizon, channels)


def _resolve_ett(path: str | Path | None) -> Path:
    if path is None:
        path = os.environ.get(ETT_ENV) or DEFAULT_ETT
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"ETT CSV not found at {path}. Get ETTh1.csv from the ETDataset repository "
                           f"(https://github.com/zhouhaoyi/ETDataset, folder ETT-small) and pass its path "
                           f"(`ftprop sequences --csv PATH`), set ${ETT_ENV}, or put it at {DEFAULT_ETT}.")
    return path


def read_ett_csv(path: str | Path | None = None) -> tuple[list[datetime.datetime], torch.Tensor]:
    """(timestamps, values (rows, 7) float64) of an ETT-format CSV; the header must be exactly ETT_COLUMNS."""
    path = _resolve_ett(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = tuple(c.strip() for c in next(reader, []))
        if header != ETT_COLUMNS:
            raise DatasetError(f"{path}: expected the ETT header {','.join(ETT_COLUMNS)}, got {','.join(header)}")
        dates, rows = [], []
        for i, row in enumerate(reader, start=2):
            if len(row) != len(ETT_COLUMNS):
                raise DatasetError(f"{path}, line {i}: expected {len(ETT_COLUMNS)} fields, got {len(row)}")
            dates.append(datetime.datetime.fromisoformat(row[0]))
            rows.append([float(v) for v in row[1:]])
    return dates, torch.tensor(rows, dtype=torch.float64)


def ett_borders(dates: list[datetime.datetime], lookback: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of train, validation and test: 12/4/4 months of 30 days, in rows of the file's
    sampling interval (ETTh1: train [0, 8640), val [8544, 11520), test [11424, 14400) at look-back 96)."""
    if len(dates) < 2:
        raise DatasetError("an ETT CSV needs at least two rows")
    per_day = round(datetime.timedelta(days=1) / (dates[1] - dates[0]))
    month = 30 * per_day
    train, val, test = 12 * month, 16 * month, 20 * month
    if len(dates) < test:
        raise DatasetError(f"an ETT CSV sampled {per_day} times a day needs {test} rows for the 12/4/4-month split, "
                           f"this one has {len(dates)}")
    return [(0, train), (train - lookback, val), (val - lookback, test)]


def check_window(option: str, value: int | None) -> None:
    """A look-back or horizon (`option` names it) is None (the task's default) or at least 1. 0 must not stand for
    the default (a window of 0 rows is a mistake, not a request for the default), and a negative one would build
    windows of inconsistent lengths that fail much later with a message naming neither option."""
    if value is not None and value < 1:
        raise ValueError(f"{option} must be >= 1, got {value} (leave it unset for the task's default)")


def load_ett(path: str | Path | None = None, lookback: int | None = None, horizon: int | None = None) -> SeqData:
    """ETT forecasting with the standard protocol (module docstring); `path` defaults to $FTPROP_ETT, then
    ../shared/data/ett/ETTh1.csv beside the repository; look-back and horizon None take 96."""
    check_window("lookback", lookback)
    check_window("horizon", horizon)
    lookback, horizon = 96 if lookback is None else lookback, 96 if horizon is None else horizon
    if horizon not in ETT_HORIZONS:
        raise ValueError(f"ETT horizon must be one of {', '.join(map(str, ETT_HORIZONS))}, got {horizon}")
    resolved = _resolve_ett(path)
    dates, values = read_ett_csv(resolved)
    return split_and_window(f"{resolved.stem} horizon {horizon}", values, ett_borders(dates, lookback), lookback,
                            horizon)


# name -> (file under statsmodels/datasets, value column, default look-back, default horizon)
STATSMODELS_SERIES = {"sunspots": ("sunspots/sunspots.csv", "SUNACTIVITY", 24, 8),
                      "co2": ("co2/co2.csv", "co2", 104, 52)}


def _statsmodels_file(relative: str) -> Path:
    """The CSV inside the installed statsmodels package, found without importing statsmodels (which needs scipy)."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("statsmodels is not installed; its wheel ships the series. Install only the files with "
                           "`pip install --no-deps statsmodels==0.15.0` (no scipy or pandas needed).")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / relative
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the installed statsmodels; reinstall it with "
                           f"`pip install --no-deps --force-reinstall statsmodels==0.15.0`")
    return path


def _interpolate(values: list[float | None]) -> torch.Tensor:
    """Fill missing values (None) linearly between their neighbours (the ends take the nearest known value)."""
    known = [i for i, v in enumerate(values) if v is not None]
    if not known:
        raise DatasetError("series has no values")
    filled = np.interp(np.arange(len(values)), known, [values[i] for i in known])
    return torch.from_numpy(filled)


def read_statsmodels_series(name: str) -> torch.Tensor:
    """The series `name` (STATSMODELS_SERIES) as (rows, 1) float64, missing values interpolated."""
    if name not in STATSMODELS_SERIES:
        raise ValueError(f"unknown series {name!r}; choose one of {', '.join(STATSMODELS_SERIES)}")
    relative, column = STATSMODELS_SERIES[name][:2]
    with open(_statsmodels_file(relative), newline="") as f:
        reader = csv.DictReader(f)
        values = [float(row[column]) if row[column].strip() else None for row in reader]
    return _interpolate(values).unsqueeze(1)


def load_statsmodels_series(name: str, lookback: int | None = None, horizon: int | None = None) -> SeqData:
    """A statsmodels series split 70/10/20 chronologically (validation and test windows start `lookback` rows early);
    look-back and horizon None take the series' defaults (STATSMODELS_SERIES)."""
    check_window("lookback", lookback)  # before the file is read: a bad option is the first thing to report
    check_window("horizon", horizon)
    series = read_statsmodels_series(name)
    default_lookback, default_horizon = STATSMODELS_SERIES[name][2:]
    lookback = default_lookback if lookback is None else lookback
    horizon = default_horizon if horizon is None else horizon
    rows = series.shape[0]
    train, val = int(0.7 * rows), int(0.8 * rows)
    borders = [(0, train), (train - lookback, val), (val - lookback, rows)]
    return split_and_window(f"{name} horizon {horizon}", series, borders, lookback, horizon)


SYNTHETIC_TASKS = ("adding", "order")  # generated from fixed seeds: no files
SEQUENCE_TASKS = (*SYNTHETIC_TASKS, "ett", *STATSMODELS_SERIES)


def _unknown_task(task: str) -> ValueError:
    return ValueError(f"unknown sequence task {task!r}; choose one of {', '.join(SEQUENCE_TASKS)} (or etth1)")


def load_sequence_task(task: str, T: int = 50, classes: int = 4, n_train: int = 10000, n_test: int = 2000,
                       csv_path: str | None = None, lookback: int | None = None,
                       horizon: int | None = None) -> SeqData:
    """One entry point for every task name in SEQUENCE_TASKS ("etth1" is accepted for "ett"); look-back and horizon
    None take the task's defaults (ETT 96 and 96)."""
    if task in SYNTHETIC_TASKS:
        return synthetic(task, T, n_train, n_test, classes)
    if task in ("ett", "etth1"):
        return load_ett(csv_path, lookback, horizon)
    if task in STATSMODELS_SERIES:
        return load_statsmodels_series(task, lookback, horizon)
    raise _unknown_task(task)


def locate_sequence_task(task: str, csv_path: str | Path | None = None) -> Path | None:
    """The file `load_sequence_task(task, csv_path=csv_path)` would read, found without reading it (None for the
    synthetic tasks), so that a caller about to run for hours can refuse at once: raises the DatasetError loading
    would, saying where it looked and how to get the file."""
    if task in SYNTHETIC_TASKS:
        return None
    if task in ("ett", "etth1"):
        return _resolve_ett(csv_path)
    if task in STATSMODELS_SERIES:
        return _statsmodels_file(STATSMODELS_SERIES[task][0])
    raise _unknown_task(task)
