"""The commands and files the docs quote are true of the code: every `ftprop ...` command in README.md,
configs/README.md and docs/*.md parses with the current CLI and passes its checks that need no data (config
files load, rule names and options exist, studies exist), every script command parses with that script's own
parser, and every configs/, scripts/, tests/ and docs/results/ file the docs name exists. Nothing here trains or
loads data, so the docs can't drift from the code unnoticed and the check takes about a second."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from ftprop import cli
from ftprop.compare import load_rule_config
from ftprop.recurrent import CELLS
from ftprop.reproduce import BUDGETS, STUDIES
from ftprop.rules import make_rule, make_sequence_rule, parse_options, rule_variant

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Placeholders the docs write in commands, and a valid value to check the command with (after --rule, R is a rule).
RULE_PLACEHOLDERS = {"R": "ftp", "RULE": "ftp"}
PLACEHOLDERS = {"DATASET": "mnist", "GAMMA": "0.1", "SCALE": "0.1", "G": "0.1", "W": "0.3", "DIST": "gaussian",
                "P": "0.2", "R": "5", "N": "2", "S": "0", "B": "64", "E": "10", "H": "96", "NAME": "mnist", "RULE": "ftp",
                "STUDY": "mlp", "SETTING": "g_scale=0.1", "HOST": "localhost"}


def _code_spans(text: str) -> list[str]:
    """The lines of fenced code blocks (a trailing backslash joins the next line) and every inline `code` span (one
    may wrap across lines of a paragraph)."""
    spans, fenced, block, prose = [], False, [], []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            block.append(line.rstrip())
            if not line.rstrip().endswith("\\"):
                spans.append(" ".join(part.rstrip("\\ ") for part in block))
                block = []
        else:
            prose.append(line)
    paragraphs = re.split(r"\n\s*\n", "\n".join(prose))
    return spans + [span.replace("\n", " ") for p in paragraphs for span in re.findall(r"`([^`]+)`", p)]


def _commands(prefix_pattern: str) -> list[tuple[str, str]]:
    """(where, command) for each command of the docs that starts with `prefix_pattern` (a regex)."""
    found = []
    for doc in DOCS:
        for span in _code_spans(doc.read_text()):
            span = span.split(" #")[0]  # a shell comment
            for part in re.split(r"&&|;", span):
                match = re.search(prefix_pattern, part)
                if match:
                    found.append((doc.relative_to(ROOT).as_posix(), part[match.start():].strip()))
    return found


def _argv_variants(words: list[str]) -> list[list[str]]:
    """A documented command as the argv lists it stands for: `...` dropped, `[--flag V]` made plain, `a|b` read as
    `a`, `256,...(10)` read as ten 256s, placeholders filled in, and `CMD X | Y --opt` read as both `CMD X --opt` and `CMD Y --opt`."""
    def fill(word: str, after: str) -> str:
        values = {**PLACEHOLDERS, **(RULE_PLACEHOLDERS if after == "--rule" else {})}
        word = word.strip("[]").split("|")[0]
        word = re.sub(r"(\d+),\.\.\.\((\d+)\)", lambda m: ",".join([m.group(1)] * int(m.group(2))), word)  # 256,...(10)
        return re.sub(r"\b([A-Z]+)\b(\.\.\.)?", lambda m: values.get(m.group(1), m.group(0)), word)

    words = [w for w in words if w != "..."]
    if "|" not in words:
        return [[fill(w, before) for before, w in zip(["", *words], words) if fill(w, before)]]
    bar = words.index("|")
    head, rest = words[:bar], words[bar + 1:]
    # the alternative after the bar replaces as many words before it as it has positional words
    alt = [w for w in rest if not w.startswith("-")]
    alt = alt[:len([w for w in head[1:] if not w.startswith("-")])]
    second = head[:len(head) - len(alt)] + rest
    return _argv_variants(head + rest[len(alt):]) + _argv_variants(second)


def _check_ftprop(argv: list[str]) -> None:
    """Parse with ftprop's parser, then run the command's own checks that need no data."""
    if len(argv) == 1:
        assert argv[0] in cli.parser()._subparsers._group_actions[0].choices, argv  # prose naming a command
        return
    args = cli.parser().parse_args(argv)
    if args.command in ("train", "compare", "bench"):
        cfg = cli._config(args)  # loads --config and checks every TrainConfig value and rule option
        names = [cfg.rule] if args.command == "train" else cli._rule_names(args.rules)
        for name in names:
            make_rule(name, **(cfg.rule_options if name == cfg.rule else {}))
        for item in getattr(args, "rule_config", []):
            rule, path = item.split("=", 1)
            load_rule_config(ROOT / path, rule)
    elif args.command == "cost":
        options = (cli._read_config(str(ROOT / args.config), args.rule).rule_options if args.config else {})
        for name in cli._rule_names(args.rules):
            make_rule(name, **(options | parse_options(args.rule_opt) if name == args.rule else {}))
    elif args.command == "sequences":
        assert args.cell in CELLS, args.cell
        for entry in args.rules.split(","):
            name, options = rule_variant(entry)
            make_sequence_rule(name, **options)
    elif args.command == "reproduce":
        assert args.budget in BUDGETS
        assert all(s in STUDIES or s == "all" for s in args.studies), args.studies


FTPROP = _commands(r"(?<![\w/-])(ftprop|-m ftprop) (train|compare|bench|cost|sequences|reproduce|data)\b")
SCRIPTS = _commands(r"python scripts/\S+\.py")


def test_the_docs_quote_commands():
    assert len(FTPROP) > 50 and SCRIPTS  # the extraction works: a change of format would silently check nothing


@pytest.mark.parametrize("where,command", FTPROP, ids=[f"{w}:{c[:60]}" for w, c in FTPROP])
def test_ftprop_commands_in_the_docs_parse(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the repository
    words = shlex.split(command)
    words = words[words.index("ftprop") + 1:]
    if "--help" in words:
        return
    for argv in _argv_variants(words):
        try:
            _check_ftprop(argv)
        except SystemExit as err:  # argparse's error went to stderr; say which doc line it was
            pytest.fail(f"{where}: `{command}` does not parse as {argv} (exit {err.code})")


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("where,command", SCRIPTS, ids=[f"{w}:{c[:60]}" for w, c in SCRIPTS])
def test_script_commands_in_the_docs_parse(where, command, monkeypatch):
    words = shlex.split(command)[1:]
    path = ROOT / words[0]
    assert path.exists(), f"{where} quotes {words[0]}, which does not exist"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main(); the `__main__` guard keeps it from running

    def parse_only(self, args=None, namespace=None):  # noqa: ANN001, ANN202  (argparse's signature)
        argparse.ArgumentParser.parse_known_args(self, args, namespace)  # raises SystemExit on an error
        raise _Parsed

    for argv in _argv_variants(words[1:]):
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with contextlib.suppress(_Parsed):
            try:
                module.main()
            except SystemExit as err:
                pytest.fail(f"{where}: `{command}` does not parse (exit {err.code})")
            pytest.fail(f"{where}: {words[0]} ran without parsing arguments")


def _named_files() -> list[tuple[str, str]]:
    pattern = re.compile(r"(?<![\w/.-])((?:configs|scripts|tests|docs/results)/[\w.-]+\.(?:toml|py|png|md|json))")
    return [(doc.relative_to(ROOT).as_posix(), name) for doc in DOCS
            for name in sorted(set(pattern.findall(doc.read_text()))) if not Path(name).stem.isupper()]  # RULE.toml


@pytest.mark.parametrize("where,name", _named_files())
def test_files_named_in_the_docs_exist(where, name):
    assert (ROOT / name).exists(), f"{where} names {name}, which does not exist"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    rule = path.stem.split("-")[0]
    load_rule_config(path, rule) if rule in cli.RULES else cli._read_config(str(path))


def _links() -> list[tuple[str, str]]:
    """Relative link and image targets of the docs, as paths from the repository root."""
    return [(doc.relative_to(ROOT).as_posix(), (doc.parent / target).resolve().relative_to(ROOT).as_posix())
            for doc in DOCS for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
            if "://" not in target]


@pytest.mark.parametrize("where,target", _links())
def test_links_in_the_docs_resolve(where, target):
    assert (ROOT / target).exists(), f"{where} links to {target}, which does not exist"


RESULT_KEYS = {"test_accuracy"}  # metrics.json keys the docs name, not tests


def test_tests_named_in_the_docs_exist():
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    named = {(doc.relative_to(ROOT).as_posix(), name) for doc in DOCS
             for name in re.findall(r"\b(test_\w+)\b(?!\.py)", doc.read_text())}
    missing = sorted((where, name) for where, name in named if name not in defined | RESULT_KEYS)
    assert not missing, f"the docs name tests that do not exist: {missing}"
