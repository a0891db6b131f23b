"""The reproduce pipeline: runs, sections, plots and an assembled RESULTS.md, on a tiny budget."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import ftprop.data
import ftprop.reproduce as rep
from ftprop import cli, report
from ftprop import study_sequences as seq
from ftprop.data import DatasetError


def test_reproduce_writes_sections_and_results(tmp_path, tiny):
    docs = tmp_path / "docs"
    (tmp_path / "README.md").write_text(f"intro\n{rep.README_START}\nold\n{rep.README_END}\nrest\n")
    results = rep.reproduce(["mlp"], "small", tmp_path / "runs", docs)
    text = results.read_text()
    assert "do not edit by hand" in text and "budget `small`" in text
    for key in ("mlp-mnist-tanh", "mlp-mnist-relu", "mlp-fashion-mnist-tanh"):
        assert (docs / "results" / f"{key}.small.png").stat().st_size > 10_000
        assert f"results/{key}.small.png" in text
    assert text.count("| ftp |") == 5 and "time / BP" in text  # 3 comparison tables + 2 bench rows
    small = rep.BUDGETS["small"]  # the bench is repeated with fresh models; time / BP shows its range over repeats
    assert (f"{small.bench_repeats} repeats, each with fresh models, of {small.rounds_per_repeat} interleaved rounds"
            in text and f"--rounds {small.rounds_per_repeat} --repeats {small.bench_repeats}`" in text)
    assert re.search(r"\| (64|256) \| ftp \| [\d.]+ \| [\d.-]+ \| \d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\) \|", text)
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n") and readme.endswith("rest\n") and "old" not in readme
    assert "| mnist, 1024-128 relu |" in readme and "step time FTP / BP" in readme
    # the header names the code and machine behind the section's runs: all trained now, here, at this version
    runs = sorted((tmp_path / "runs" / "small").glob("*/*-seed*/config.json"))
    assert f"code: {report.code_version()} ({len(runs)} runs). " in text
    assert f"made on: {report.machine()} ({len(runs)} runs); " in text
    # a reused run from before versions were recorded is counted as such, not passed off as today's code, and a run
    # another machine made is named with that machine, not with the one assembling the section
    json.dump({k: v for k, v in json.loads(runs[0].read_text()).items() if k != "code"}, runs[0].open("w"))
    json.dump(json.loads(runs[1].read_text()) | {"machine": "elsewhere"}, runs[1].open("w"))
    text = rep.reproduce(["mlp"], "small", tmp_path / "runs", docs).read_text()
    assert f"code: {report.code_version()} ({len(runs) - 1} runs), not recorded (older run) (1 run). " in text
    assert f"made on: {report.machine()} ({len(runs) - 1} runs), elsewhere (1 run); " in text
    assert f") on {report.machine()}, which also measured any step-time table below; " in text
    # a full-budget section, once present, wins over the small one
    (docs / "results" / "mlp.full.md").write_text("## full section\n")
    assert "full section" in rep.assemble(docs).read_text() and "budget `small`" not in (docs / "RESULTS.md").read_text()


def test_unknown_study_or_budget(tmp_path):
    with pytest.raises(ValueError, match="unknown study"):
        rep.reproduce(["nope"], "small", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="unknown budget"):
        rep.reproduce(["mlp"], "medium", tmp_path, tmp_path)


def test_peers_study_runs_every_rule_with_its_config(tmp_path, tiny, monkeypatch):
    real = rep.run_compare
    seen = {}

    def spy(base, rules, *a, rule_configs=None, **k):
        seen[base.hidden, base.dataset, base.activation] = (rules, rule_configs)
        return real(base, rules, *a, rule_configs=rule_configs, **k)

    monkeypatch.setattr(rep, "run_compare", spy)
    text = rep.reproduce(["peers-pepita-setup", "peers"], "small", tmp_path / "runs", tmp_path / "docs").read_text()
    rules, configs = seen["1024,128", "mnist", "relu"]
    assert rules == ["bp", "fa", "dfa", "drtp", "pepita", "dtp", "ff", "ftp"]
    assert configs == {r: rep.load_rule_config(rep.CONFIGS / f"{r}.toml") for r in rules
                       if (rep.CONFIGS / f"{r}.toml").exists()}
    assert configs["ftp"]["rule"]["g_scale"] == 0.05 and configs["ff"]["optimizer"] == "adam"
    assert seen["1024", "mnist", "relu"][0] == ["bp", "fa", "dfa", "drtp", "pepita"]
    assert seen["1024", "mnist", "tanh"][0] == ["bp", "drtp"]  # DRTP with its paper's activation
    assert text.count("| pepita |") == 3 + 1 and "FLOPs / BP" in text and "--rule-config ff=configs/ff.toml" in text
    assert "- pepita: " in text and "against a target of 97.8%" in text and "FTP (" in text
    bench = text.split("### Step time of every rule")[1]
    assert all(f"| {r} |" in bench for r in rules) and "FTP / BP = " in bench
    assert re.search(r"\| ftp \| [\d.]+ \| [\d.-]+ \| \d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\) \|", bench)


@pytest.fixture
def fake_studies(monkeypatch):
    """Two studies that train nothing, read no data and record the order they ran in."""
    ran = []

    def study(name):
        def run(budget, runs, figures):
            ran.append(name)
            return f"### {name}\n", [[name, "-", "-"]]
        return rep.Study(name, f"title {name}", run, lambda budget: ())

    monkeypatch.setattr(rep, "STUDIES", {n: study(n) for n in ("one", "two")})
    return ran


def test_study_names_all_anywhere_and_each_once(tmp_path, fake_studies):
    rep.reproduce(["two", "all", "two"], "small", tmp_path / "runs", tmp_path / "docs")
    assert fake_studies == ["two", "one"]  # `all` among other names adds the rest; a repeat does not rerun
    with pytest.raises(ValueError, match="unknown study nope; choose from all, one, two"):
        rep.reproduce(["all", "nope"], "small", tmp_path / "runs", tmp_path / "docs")


def test_section_names_the_runs_folder_it_read(tmp_path, fake_studies):
    text = rep.reproduce(["one"], "small", tmp_path / "elsewhere", tmp_path / "docs").read_text()
    assert f"runs read from {tmp_path / 'elsewhere' / 'small'}, where" in text and "results/runs" not in text
    # and the rerun command it gives writes where this run did (it named neither folder)
    assert (f"Rerun: `ftprop reproduce one --budget small --runs {tmp_path / 'elsewhere'} --docs {tmp_path / 'docs'}`"
            in text)


def test_section_rerun_command_names_only_folders_that_are_not_the_defaults(tmp_path, fake_studies, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the defaults are relative to where reproduce runs
    text = rep.reproduce(["one"], "small", Path("results/runs"), Path("docs")).read_text()
    assert "Rerun: `ftprop reproduce one --budget small`." in text


def test_unwritable_docs_refused_before_any_study_trains(tmp_path, fake_studies, monkeypatch):
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "RESULTS.md").write_text("# Results\n")
    real = rep.os.access  # chmod does not stop root, who runs the suite in some containers: the check is os.access
    monkeypatch.setattr(rep.os, "access", lambda p, mode: Path(p).name != "RESULTS.md" and real(p, mode))
    with pytest.raises(ValueError, match=f"--docs {docs}: cannot write {docs / 'RESULTS.md'}; .*another --docs"):
        rep.reproduce(["one"], "small", tmp_path / "runs", docs)
    assert fake_studies == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create"):
        rep.reproduce(["one"], "small", tmp_path / "runs", tmp_path / "file")


def test_run_compare_reuses_only_intact_matching_runs(tmp_path, tiny, monkeypatch, capsys):
    """A finished run is reused only when its config matches; a changed option, or a damaged or partial run
    directory (truncated JSON, no metrics.json or metrics.jsonl), is trained again instead of stopping the study."""
    import ftprop.compare as compare
    trained = []
    real = compare.train
    monkeypatch.setattr(compare, "train", lambda cfg, *a, **k: trained.append(cfg.rule) or real(cfg, *a, **k))
    base = rep.TrainConfig(dataset="mnist", hidden="32", epochs=1, progress=False)
    out = tmp_path / "cmp"
    first = compare.run_compare(base, ["bp"], 1, out, resume=True).results["bp"]
    run = out / "bp-seed0"
    assert trained == ["bp"]
    assert compare.run_compare(base, ["bp"], 1, out, resume=True).results["bp"] == first and trained == ["bp"]
    compare.run_compare(dataclasses.replace(base, lr=base.lr / 2), ["bp"], 1, out, resume=True)
    assert len(trained) == 2  # another learning rate: another run
    compare.run_compare(base, ["bp"], 1, out, resume=True)
    assert len(trained) == 3
    for damage in (lambda: (run / "metrics.json").write_text('{"test_accuracy": 0.'),
                   lambda: (run / "config.json").write_text("{"),
                   lambda: (run / "config.json").write_text("[]"),
                   lambda: (run / "metrics.json").unlink(),
                   lambda: (run / "metrics.jsonl").unlink()):
        damage()
        n = len(trained)
        summary = compare.run_compare(base, ["bp"], 1, out, resume=True).results["bp"][0]
        assert len(trained) == n + 1 and summary["test_accuracy"] == first[0]["test_accuracy"]
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert "cmp/bp-seed0/metrics.json is unreadable" in capsys.readouterr().err


def _models_of_another_size(run: Path, cfg) -> None:
    other = dataclasses.replace(cfg, hidden=cfg.hidden + 1)  # as if the model had changed since: same keys, new shapes
    torch.save({rule: other.build(cfg.load()).state_dict() for rule in seq.RULES}, run / "models.pt")


# (damage to a sequences task's saved runs, the file named, why)
SEQUENCE_DAMAGES = {
    "results cut short": (lambda run, cfg: (run / "results.json").write_text('{"runs": {"bptt": ['), "results.json",
                          ""),
    "models cut short": (lambda run, cfg: (run / "models.pt").write_bytes((run / "models.pt").read_bytes()[:200]),
                         "models.pt", "torch cannot read it: RuntimeError"),
    "models empty": (lambda run, cfg: (run / "models.pt").write_bytes(b""), "models.pt", "EOFError"),
    "models not a torch file": (lambda run, cfg: (run / "models.pt").write_text('{"bptt": 1}'), "models.pt",
                                "UnpicklingError"),
    "models not a dict": (lambda run, cfg: torch.save(torch.zeros(2), run / "models.pt"), "models.pt",
                          "it holds a Tensor"),
    "models with other keys": (
        lambda run, cfg: torch.save({r: {"w": torch.zeros(1)} for r in seq.RULES}, run / "models.pt"), "models.pt",
        "Missing key(s) in state_dict"),
    "models of another size": (_models_of_another_size, "models.pt", "size mismatch for"),
}


@pytest.mark.parametrize("damage", SEQUENCE_DAMAGES)
def test_sequences_task_with_damaged_runs_is_trained_again(tmp_path, monkeypatch, capsys, damage):
    """A sequences task's results.json or models.pt damaged (a bad copy of the versioned runs), or models.pt holding
    other models than this code builds, is named in one line and the task retrained, not a crash in json or torch."""
    cfg = seq.SeqConfig(task="adding", T=5, n_train=64, n_test=32, epochs=1)
    calls = []

    def fake(cfg_, rules, seeds, bench_rounds, data, done):
        calls.append(done)
        return {"runs": {r: [] for r in rules}}, {r: cfg_.build(data) for r in rules}

    monkeypatch.setattr(seq, "run_sequences", fake)
    seq._run(cfg, 1, 1, tmp_path)
    harm, name, why = SEQUENCE_DAMAGES[damage]
    harm(tmp_path, cfg)
    results, models, _ = seq._run(cfg, 1, 1, tmp_path)
    assert calls == [{}, {}] and set(models) == set(seq.RULES)
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith(f"{tmp_path / name} is not reusable by this code") and why in note
    assert json.loads((tmp_path / "results.json").read_text())["key"]["seeds"] == 1  # rewritten whole
    seq._run(cfg, 1, 1, tmp_path)  # and models.pt too: both are reused now
    assert len(calls) == 2 and not capsys.readouterr().err


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """No dataset anywhere (offline sources hidden, an empty $FTPROP_DATA and user cache, $FTPROP_ETT pointing at
    nothing); returns a function that provides one dataset's files there, empty: finding them must be enough, since
    `reproduce` checks its data without loading it."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("FTPROP_DATA", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FTPROP_ETT", str(root / "ETTh1.csv"))
    for name, (what, _) in list(ftprop.data.OFFLINE_SOURCES.items()):
        monkeypatch.setitem(ftprop.data.OFFLINE_SOURCES, name, (what, lambda: None))

    def provide(name: str) -> None:
        if name == "ett":
            (root / "ETTh1.csv").touch()
            return
        (root / name).mkdir()
        for file in ftprop.data._IDX_FILES:
            (root / name / file).touch()
    return provide


def _needs(monkeypatch, name: str, *datasets: str) -> None:
    """Study `name` declares that it reads `datasets`."""
    monkeypatch.setitem(rep.STUDIES, name, dataclasses.replace(rep.STUDIES[name], datasets=lambda budget: datasets))


def test_missing_datasets_refused_before_any_study_trains(tmp_path, fake_studies, data_home, monkeypatch):
    _needs(monkeypatch, "one", "mnist")
    _needs(monkeypatch, "two", "mnist", "fashion-mnist", "ett")
    data_home("mnist")
    with pytest.raises(ValueError, match="unknown study"):  # the argument checks come first
        rep.reproduce(["one", "nope"], "small", tmp_path / "runs", tmp_path / "docs")
    with pytest.raises(DatasetError) as refused:
        rep.reproduce(["all"], "small", tmp_path / "runs", tmp_path / "docs")
    assert fake_studies == []
    message = str(refused.value)
    assert message.startswith("2 datasets the studies need at budget small cannot be found; no study has started:\n"
                              "fashion-mnist, needed by two:\n  Fashion-MNIST not found. Looked in:\n")
    assert "apt-get install dataset-fashion-mnist" in message  # how to get it, from the loader's own message
    assert "\nett, needed by two:\n  ETT CSV not found at " in message and "ETDataset" in message
    assert "mnist, needed by" not in message.replace("fashion-mnist, needed by", "")  # found: not listed
    data_home("fashion-mnist")
    data_home("ett")
    rep.reproduce(["all"], "small", tmp_path / "runs", tmp_path / "docs")  # empty files: found, never loaded
    assert fake_studies == ["one", "two"]


def test_datasets_checked_are_those_of_the_budget(tmp_path, data_home, monkeypatch):
    """The hardware study reads Fashion-MNIST only at the full budget: without it, only the full budget is refused."""
    ran = []
    monkeypatch.setitem(rep.STUDIES, "hardware", dataclasses.replace(
        rep.STUDIES["hardware"], run=lambda budget, runs, figures: ran.append(budget.name) or ("", [])))
    data_home("mnist")
    rep.reproduce(["hardware"], "small", tmp_path / "runs", tmp_path / "docs")
    assert ran == ["small"]
    with pytest.raises(DatasetError, match="^1 dataset the studies need at budget full cannot be found; .*\n"
                                           "fashion-mnist, needed by hardware:"):
        rep.reproduce(["hardware"], "full", tmp_path / "runs", tmp_path / "docs")
    assert ran == ["small"]


def test_sequences_study_declares_the_series_it_reads_not_the_generated_tasks():
    for budget in rep.BUDGETS.values():
        assert rep.STUDIES["sequences"].datasets(budget) == ("ett", "co2")


def test_cli_reproduce_without_a_dataset_exits_with_the_message(tmp_path, data_home, monkeypatch, capsys):
    monkeypatch.setitem(rep.STUDIES, "depth", dataclasses.replace(
        rep.STUDIES["depth"], run=lambda *a: pytest.fail("the depth study must not start")))
    data_home("mnist")
    assert cli.main(["reproduce", "depth", "--budget", "small", "--runs", str(tmp_path / "runs"),
                     "--docs", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftprop: error: 1 dataset the studies need at budget small cannot be found; no study has "
                          "started:\nfashion-mnist, needed by depth:\n  Fashion-MNIST not found.")
    assert "ftprop data fetch fashion-mnist" in err and "Traceback" not in err
