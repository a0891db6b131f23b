"""Shared fixtures: a small slice of real MNIST, loaded once per session."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from ftprop.data import Dataset, DatasetError, load_dataset

# Test nets are small: one thread is fastest for them and keeps the suite fast on a machine busy with other work.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    try:
        return load_dataset("mnist", val_size=1000)
    except DatasetError as err:  # CI installs it; a developer without it gets the reason
        pytest.skip(f"MNIST not available: {err}")


@pytest.fixture(scope="session")
def small_mnist(mnist: Dataset) -> Dataset:
    """4000 training images: enough to see learning in seconds."""
    return dataclasses.replace(mnist, x_train=mnist.x_train[:4000], y_train=mnist.y_train[:4000],
                               x_test=mnist.x_test[:2000], y_test=mnist.y_test[:2000])


def sgd_losses(net: torch.nn.Module, rule, x: torch.Tensor, y: torch.Tensor, epochs: int) -> list[float]:
    """Train with `rule` and SGD (lr 0.01, momentum 0.9, batch 64, seeded order); the loss of every step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            losses.append(rule.step(net, x[idx], y[idx]).loss.item())
            opt.step()
    return losses


def tiny_batch(n: int = 7, d_in: int = 6, n_out: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=gen, dtype=torch.float64),
            torch.randint(0, n_out, (n,), generator=gen))


@pytest.fixture
def declared_datasets(monkeypatch):
    """Every study `reproduce` runs in the test checks that it read exactly the datasets it declares (Study.datasets),
    which `reproduce` finds before any study starts: one read but not declared would be missed until the study got to
    it, possibly hours in; one declared but not read would refuse a run that needs no such data. Image datasets are
    recorded where every loader finds their files, sequence tasks where SeqConfig.load reads them (a task read from
    another CSV than the default is recorded as such: the check looks for the default)."""
    import ftprop.data
    import ftprop.reproduce as rep
    import ftprop.seqtrain
    from ftprop.sequences import SYNTHETIC_TASKS

    read: list[str] = []
    find, load_task = ftprop.data.find_dataset_files, ftprop.seqtrain.load_sequence_task

    def finding(name, *a, **k):
        read.append(name)
        return find(name, *a, **k)

    def loading(task, *a, **k):
        csv = inspect.signature(load_task).bind(task, *a, **k).arguments.get("csv_path")
        if task not in SYNTHETIC_TASKS:
            read.append(task if csv is None else f"{task} from {csv}")
        return load_task(task, *a, **k)

    def checked(study: rep.Study) -> rep.Study:
        def run(budget, runs, figures):
            start = len(read)
            out = study.run(budget, runs, figures)
            assert set(read[start:]) == set(study.datasets(budget)), \
                f"study {study.name} read {sorted(set(read[start:]))}, declares {study.datasets(budget)}"
            return out
        return dataclasses.replace(study, run=run)

    monkeypatch.setattr(ftprop.data, "find_dataset_files", finding)
    monkeypatch.setattr(ftprop.seqtrain, "load_sequence_task", loading)
    for name, study in rep.STUDIES.items():
        monkeypatch.setitem(rep.STUDIES, name, checked(study))


@pytest.fixture
def tiny(monkeypatch, declared_datasets):
    """Studies on 1000 training, 500 validation and 500 test images, one epoch, one seed: the pipeline in seconds;
    each study run through `reproduce` checks its declared datasets (`declared_datasets`)."""
    import ftprop.compare
    import ftprop.reproduce as rep

    def small(name, *a, **k):
        d = load_dataset(name, *a, **k)
        return dataclasses.replace(d, x_train=d.x_train[:1000], y_train=d.y_train[:1000], x_val=d.x_val[:500],
                                   y_val=d.y_val[:500], x_test=d.x_test[:500], y_test=d.y_test[:500])

    monkeypatch.setattr(ftprop.compare, "load_dataset", small)
    monkeypatch.setattr(ftprop.compare, "TIMING_ROUNDS", 1)  # every comparison table still times its rules, briefly
    monkeypatch.setattr(ftprop.compare, "TIMING_REPEATS", 2)
    monkeypatch.setitem(rep.BUDGETS, "small", rep.Budget("small", epochs=1, seeds=1, bench_rounds=1))
