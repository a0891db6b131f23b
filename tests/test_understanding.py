"""Issue 7's studies (alignment, gamma, feedback, label noise) end to end on the tiny budget, and label noise."""
from __future__ import annotations

import importlib
import json
import re

import pytest
import torch

import ftprop.reproduce as rep
import ftprop.study_understanding as su
from ftprop.cli import _config, parser
from ftprop.train import TrainConfig, noisy_labels, train


@pytest.fixture
def often(monkeypatch):
    monkeypatch.setitem(su.ALIGN_EVERY, "small", 4)  # 16 steps an epoch on the tiny data: 4 records per run


def _section(tmp_path, name):
    rep.reproduce([name], "small", tmp_path / "runs", tmp_path / "docs")
    figures = tmp_path / "docs" / "results"
    assert (figures / f"{name}.small.png").stat().st_size > 10_000
    text = (figures / f"{name}.small.md").read_text()
    assert f"results/{name}.small.png" in text and f"ftprop reproduce {name} --budget small" in text
    assert "budget `small`" in (tmp_path / "docs" / "RESULTS.md").read_text()
    return text


def test_alignment_study(tmp_path, tiny, often):  # noqa: F811
    text = _section(tmp_path, "alignment")
    for rule in su.ALIGN_RULES:
        assert text.count(f"| {rule} | layer ") == 3  # 784-1024-128-10: three layers
        log = tmp_path / "runs/small/alignment-mnist" / f"{rule}-seed0" / "alignment.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(records) == 4
        assert all(0 <= row["angle_deg"] <= 180 for rec in records for row in rec["layers"])
    assert "| rule | layer | step 0 | step 4 | step 8 | step 12 |" in text
    cells = re.findall(r"\| (?:ftp|dfa|fa|pepita) \| layer \d \| ([^\n]+) \|", text)
    assert all(0 <= float(v) <= 180 for row in cells for v in row.split(" | "))
    assert "--log-alignment 4" in text


def test_gamma_study(tmp_path, tiny):  # noqa: F811
    text = _section(tmp_path, "gamma")
    for dataset in ("mnist", "fashion-mnist"):
        for g in ("0.01", "0.1", "1"):
            assert f"| {dataset} | {g} |" in text
    sentence = re.search(r"\*\*(MNIST accuracy varies by less than 0\.3 points \(spread ([0-9.]+) points.*?)\*\*|"
                         r"\*\*(No two neighbouring gamma values.*?)\*\*", text)
    assert sentence, "the computed range sentence"
    if sentence.group(2):
        assert float(sentence.group(2)) < 0.3
    for option, value in su.OPEN_CHOICES:
        assert f"| {option} = {value} |" in text
    assert "| default (gamma 0.1) |" in text


def test_flat_range_is_computed():
    g = [0.01, 0.0316, 0.1, 0.316, 1.0]
    assert su.flat_range(g, [90.0, 97.5, 97.7, 97.6, 95.0]) == (1, 3)
    assert su.flat_range(g, [90.0, 97.5, None, 97.6, 95.0]) is None
    assert su.flat_range(g, [97.0, 97.1, 97.5, 97.6, 97.0]) in {(0, 1), (2, 3)}
    assert su.gamma_grid(False) == [0.01, 0.1, 1.0] and len(su.gamma_grid(True)) == 7


def test_feedback_study(tmp_path, tiny, often):  # noqa: F811
    text = _section(tmp_path, "feedback")
    for v in su.feedback_variants(False):
        assert f"| {su._label(v)} |" in text
    angles = re.findall(r"\| (?:gaussian|uniform|sparse|orthogonal)[^|]*\| [^|]+\| ([0-9.]+) \| ([0-9.]+) \|", text)
    assert len(angles) == len(su.feedback_variants(False))
    assert all(0 <= float(a) <= 180 for row in angles for a in row)


def test_label_noise_study(tmp_path, tiny):  # noqa: F811
    text = _section(tmp_path, "label-noise")
    assert text.count("| rule | 0% noise | 60% noise |") == 2 and su.noise_levels(True) == [0.0, 0.2, 0.4, 0.6]
    assert text.count("| ftp |") == 2 and text.count("| dfa |") == 2 and "--label-noise P" in text
    cfg = json.loads((tmp_path / "runs/small/noise-mnist-60/bp-seed0/config.json").read_text())
    assert cfg["label_noise"] == 0.6


@pytest.mark.parametrize("p", [0.0, 0.2, 0.6])
def test_noisy_labels_change_exactly_round_pn_to_other_classes(p):
    y = torch.randint(0, 10, (1001,), generator=torch.Generator().manual_seed(1))
    noisy = noisy_labels(y, p, 10, seed=3)
    changed = noisy != y
    assert int(changed.sum()) == round(p * len(y)) and noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(noisy, noisy_labels(y, p, 10, seed=3)) and torch.equal(y, y.clone())  # seeded, input untouched
    if p:
        assert not torch.equal(noisy, noisy_labels(y, p, 10, seed=4))
        counts = torch.bincount((noisy[changed] - y[changed]) % 10, minlength=10)
        assert counts[0] == 0 and (counts[1:] > 0).all()  # every other class reachable, never the same one


def test_label_noise_touches_training_labels_only(small_mnist, monkeypatch):
    tr = importlib.import_module("ftprop.train")
    seen, stepped = [], []
    real_eval, real_batches = tr.evaluate, tr.batches
    monkeypatch.setattr(tr, "evaluate", lambda m, r, x, y, *a: seen.append(y) or real_eval(m, r, x, y, *a))
    monkeypatch.setattr(tr, "batches", lambda *a: (stepped.append(i) or i for i in real_batches(*a)))
    labels = []

    def spy_rule(*a, **k):
        rule = real_make_rule(*a, **k)
        step = rule.step
        rule.step = lambda model, x, y: labels.append(y) or step(model, x, y)
        return rule

    real_make_rule = tr.make_rule
    monkeypatch.setattr(tr, "make_rule", spy_rule)
    before = [t.clone() for t in (small_mnist.y_train, small_mnist.y_val, small_mnist.y_test)]
    cfg = TrainConfig(rule="bp", hidden="16", epochs=1, label_noise=0.5, progress=False, seed=2)
    train(cfg, small_mnist)
    assert all(torch.equal(a, b) for a, b in zip(before, (small_mnist.y_train, small_mnist.y_val, small_mnist.y_test)))
    assert seen[0] is small_mnist.y_val and seen[1] is small_mnist.y_test  # evaluated on the clean labels
    assert sorted(torch.cat(stepped).tolist()) == list(range(len(small_mnist.y_train)))
    noisy = noisy_labels(small_mnist.y_train, 0.5, 10, 2)
    assert int((noisy != small_mnist.y_train).sum()) == len(small_mnist.y_train) // 2
    assert torch.equal(torch.cat(labels), noisy[torch.cat(stepped)])  # the rule trained on the noisy labels


def test_label_noise_validation_and_cli():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_noise must be in"):
            TrainConfig(label_noise=bad)
    args = parser().parse_args(["train", "--label-noise", "0.4"])
    assert _config(args).label_noise == 0.4
