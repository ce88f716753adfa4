"""Shared session fixtures: the tiny chain built once through the real verbs.

    tiny_raw     pyllama_data/tiny (Meta layout, 2 shards, its tokenizer.model inside)
    tiny_hf      llama-tiny-hf            (vicunaflow convert)
    tiny_delta   vicuna-tiny-delta-v1.1   (vicunaflow synth delta: lmsys's .bin layout)
    tiny_vicuna  vicuna-tiny-all-v1.1     (vicunaflow apply-delta)

They live under one session tmp dir and are shared by every test: treat them as read-only
(copy with shutil.copytree before changing anything).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-chain")


@pytest.fixture(scope="session")
def tiny_raw(tiny_root) -> Path:
    from vicunaflow.synth import synth_llama

    return synth_llama(folder=tiny_root / "pyllama_data", model_size="tiny")


@pytest.fixture(scope="session")
def tiny_hf(tiny_root, tiny_raw) -> Path:
    from vicunaflow.convert import convert

    return convert(input_dir=tiny_raw, output_dir=tiny_root / "llama-tiny-hf")


@pytest.fixture(scope="session")
def tiny_delta(tiny_root, tiny_hf) -> Path:
    from vicunaflow.synth import synth_delta

    return synth_delta(base=tiny_hf, output_dir=tiny_root / "vicuna-tiny-delta-v1.1")


@pytest.fixture(scope="session")
def tiny_vicuna(tiny_root, tiny_hf, tiny_delta) -> Path:
    from vicunaflow.delta import apply_delta

    return apply_delta(base=tiny_hf, delta=tiny_delta, target=tiny_root / "vicuna-tiny-all-v1.1")


@pytest.fixture(scope="session")
def skip_or_fail():
    """Skip an end-to-end test that cannot run here (no root, no chromium); under `make test`
    (VICUNAFLOW_REQUIRE_E2E=1), which installs everything it needs, fail instead: there a missing
    piece is a bug, not a reason to skip."""

    def skip_or_fail(reason: str) -> None:
        if os.environ.get("VICUNAFLOW_REQUIRE_E2E") == "1":
            pytest.fail(reason)
        pytest.skip(reason)

    return skip_or_fail
