"""The reproduce pipeline: runs, sections, plots and an assembled RESULTS.md, on a tiny budget."""
from __future__ import annotations

import dataclasses

import pytest

import ftprop.reproduce as rep


def test_reproduce_writes_sections_and_results(tmp_path, monkeypatch):
    real = rep.run_compare

    def on_1000_images(base, *a, **k):  # same pipeline, a thousandth of the compute
        return real(dataclasses.replace(base, val_size=59000), *a, **k)

    monkeypatch.setattr(rep, "run_compare", on_1000_images)
    monkeypatch.setitem(rep.BUDGETS, "small", rep.Budget("small", epochs=1, seeds=1, bench_rounds=1))
    docs = tmp_path / "docs"
    (tmp_path / "README.md").write_text(f"intro\n{rep.README_START}\nold\n{rep.README_END}\nrest\n")
    results = rep.reproduce(["mlp"], "small", tmp_path / "runs", docs)
    text = results.read_text()
    assert "do not edit by hand" in text and "budget `small`" in text
    for key in ("mlp-mnist-tanh", "mlp-mnist-relu", "mlp-fashion-mnist-tanh"):
        assert (docs / "results" / f"{key}.small.png").stat().st_size > 10_000
        assert f"results/{key}.small.png" in text
    assert text.count("| ftp |") == 5 and "time / BP" in text  # 3 comparison tables + 2 bench rows
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n") and readme.endswith("rest\n") and "old" not in readme
    assert "| mnist, 1024-128 relu |" in readme and "step time FTP / BP" in readme
    # a full-budget section, once present, wins over the small one
    (docs / "results" / "mlp.full.md").write_text("## full section\n")
    assert "full section" in rep.assemble(docs).read_text() and "budget `small`" not in (docs / "RESULTS.md").read_text()


def test_unknown_study_or_budget(tmp_path):
    with pytest.raises(ValueError, match="unknown study"):
        rep.reproduce(["nope"], "small", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="unknown budget"):
        rep.reproduce(["mlp"], "medium", tmp_path, tmp_path)
