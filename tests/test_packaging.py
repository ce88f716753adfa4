"""pyproject.toml's extras, the conda envs of the rules (envs/*.yaml) and the rules that use them agree.

Installing each extra for real is tests/e2e/test_install.py; these checks are instant.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# The extra a verb needs beyond the core dependencies, for the rules that run it.
VERB_EXTRA = {"chat": "serve", "serve": "serve", "finetune": "train"}


def pins() -> dict[str, set[str]]:
    """Package name -> every exact version pyproject.toml pins it to (core and extras)."""
    found: dict[str, set[str]] = {}
    for spec in [*PROJECT["dependencies"], *(s for specs in EXTRAS.values() for s in specs)]:
        if match := re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^;\s]+)", spec.strip()):
            found.setdefault(match.group(1).lower().replace("_", "-"), set()).add(match.group(3))
    return found


def env_extras(env_file: Path) -> set[str]:
    """The extras an env installs vicunaflow with (`-e ${VICUNAFLOW_ROOT}[a,b]`)."""
    dependencies = yaml.safe_load(env_file.read_text())["dependencies"]
    (pip,) = [d["pip"] for d in dependencies if isinstance(d, dict)]
    (ours,) = [p for p in pip if "VICUNAFLOW_ROOT" in p]
    match = re.fullmatch(r"-e \$\{VICUNAFLOW_ROOT\}(?:\[([\w,]+)\])?", ours)
    assert match, f"{env_file.name}: {ours!r}"
    return set(filter(None, (match.group(1) or "").split(",")))


def test_one_version_per_package() -> None:
    """A package pinned in several extras (accelerate: serve and dev) is pinned to one version."""
    assert {name: versions for name, versions in pins().items() if len(versions) > 1} == {}


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_installs_pinned_torch_and_known_extras(env_file: Path) -> None:
    dependencies = yaml.safe_load(env_file.read_text())["dependencies"]
    (pip,) = [d["pip"] for d in dependencies if isinstance(d, dict)]
    torch = [p for p in pip if p.startswith("torch")]
    assert torch == [f"torch=={next(iter(pins()['torch']))}"], f"{env_file.name}: torch as pyproject.toml pins it"
    assert len(pip) == 2, f"{env_file.name}: pins beyond torch belong in pyproject.toml's extras: {pip}"
    unknown = env_extras(env_file) - set(EXTRAS) - {"dev"}
    assert not unknown and "dev" not in env_extras(env_file), f"{env_file.name}: extras {unknown}"


def test_rules_run_verbs_in_an_env_with_their_extra() -> None:
    """`vicunaflow chat` under --use-conda needs [serve] (transformers, accelerate), finetune needs [train]."""
    checked = 0
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule \w+:)", smk.read_text()):
            env = re.search(r"envs/(\w+)\.yaml", block)
            verbs = set(re.findall(r"vicunaflow (\w+)", block)) & set(VERB_EXTRA)
            if not env or not verbs:
                continue
            extras = env_extras(REPO / "envs" / f"{env.group(1)}.yaml")
            for verb in verbs:
                checked += 1
                assert VERB_EXTRA[verb] in extras, f"{smk.name}: `vicunaflow {verb}` in envs/{env.group(1)}.yaml"
    assert checked >= 2  # chat_smoke and the fine-tuning rule at least
