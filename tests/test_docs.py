"""Every `snakemake ...` command the docs, configs and comments show parses as meant.

`--configfile` and `--config` take several values, so `snakemake --configfile my.yaml vicuna-7b-all-v1.1`
reads the target as a second config file and crashes. Each example is run through Snakemake's own
argument parser, and the parse is checked: what it takes as config files look like config files, what it
takes as `--config` items are `key=value`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGET = "vicuna-7b-all-v1.1"  # stands in for a placeholder such as <targets> or ...
PLACEHOLDERS = {"...", "<target>", "<targets>", "[targets]", "[target]", "TARGET", "TARGETS"}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SHELL_BREAKS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


def documentation_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "Makefile", REPO / "Snakefile"]
    for folder, patterns in {
        "docs": ["*.md"],
        "config": ["*.md", "*.yaml"],
        "profiles": ["**/*.yaml"],
        "envs": ["*.yaml"],
        "workflow": ["**/*.smk", "**/*.yaml", "**/*.py"],
        "src/vicunaflow": ["**/*.py", "**/*.md"],
        "bench": ["**/*.py", "**/*.md"],
        "scripts": ["**/*.py"],
    }.items():
        for pattern in patterns:
            files += sorted((REPO / folder).glob(pattern))
    return [f for f in files if f.is_file()]


def snakemake_commands(text: str) -> list[str]:
    """The `snakemake ...` command lines in a file: fenced lines (with `\\` continuations), inline
    code spans (which may wrap across lines) and comments, each cut at a shell operator or comment."""
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    pieces = [m.group(1).replace("\n", " ") for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)]
    pieces += text.splitlines()
    commands = []
    for piece in pieces:
        for match in re.finditer(r"(?:^|[\s(/\"'`])snakemake((?:[ \t]+[^\s#`\"'\\]+)+)", piece):
            if (command := "snakemake" + match.group(1)) not in commands:
                commands.append(command)
    return commands


def parse_example(command: str):
    """Snakemake's parse of an example; placeholders become a target, shell variables a number."""
    from snakemake.cli import get_argument_parser

    words = []
    for word in shlex.split(command)[1:]:
        if word in SHELL_BREAKS:
            break
        words.append(TARGET if word in PLACEHOLDERS else re.sub(r"\$\(\w+\)|\$\{?\w+\}?", "1", word))
    return get_argument_parser().parse_args(words)


def problems(command: str) -> list[str]:
    try:
        args = parse_example(command)
    except SystemExit:
        return ["Snakemake's argument parser refuses it"]
    found = []
    for path in args.configfile or []:
        if not str(path).endswith(CONFIG_SUFFIXES):
            found.append(f"--configfile reads {path!s} as a config file: put --configfile after the targets")
    for item in args.config or []:
        if "=" not in item:
            found.append(f"--config reads {item!r} as key=value: put --config after the targets")
    return found


def all_examples() -> list[tuple[str, str]]:
    examples = []
    for path in documentation_files():
        for command in snakemake_commands(path.read_text(errors="replace")):
            examples.append((str(path.relative_to(REPO)), command))
    return examples


def test_the_examples_are_found() -> None:
    examples = all_examples()
    commands = {command for _, command in examples}
    assert any("--configfile" in c for c in commands), "no --configfile example found: is the extraction broken?"
    assert any(where.startswith("docs/") for where, _ in examples)
    assert "snakemake -n --profile profiles/slurm <target>" in commands  # an inline span wrapped over two lines


def test_the_check_catches_options_before_targets() -> None:
    pytest.importorskip("snakemake")
    assert problems("snakemake --configfile my.yaml vicuna-13b-all-v1.1")
    assert problems("snakemake --profile profiles/slurm --configfile my-test.yaml ...")
    assert problems("snakemake --config llama.source=hf llama-7b-hf")
    assert not problems("snakemake vicuna-13b-all-v1.1 --configfile my.yaml --cores 8")
    assert not problems("snakemake --configfile config/demo.yaml --cores 1 --show-failed-logs")


@pytest.mark.parametrize(("where", "command"), all_examples(), ids=lambda v: v if "/" in v else None)
def test_snakemake_examples_parse_as_meant(where: str, command: str) -> None:
    pytest.importorskip("snakemake")
    assert not problems(command), f"{where}: `{command}`: {problems(command)}"


def test_no_reference_points_outside_the_repository() -> None:
    """A source, doc or config cites what a reader of this repository can open, not a path beside the checkout."""
    outside = re.compile(r"\.\./shared/")  # the engineers' reference folder beside the checkout
    hits = [
        f"{path.relative_to(REPO)}:{number}"
        for path in documentation_files() + sorted((REPO / "tests").glob("**/*.py"))
        if path.name != "test_docs.py"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, hits
