"""Each extra installed alone into a fresh virtualenv runs its entry points on the tiny model.

`pip install -e '.[serve]'` (and envs/serve.yaml, which installs `[serve]`) once lacked accelerate,
which transformers needs for any device_map; the dev environment, with every extra, hid it. Here each
of `vicunaflow`, `[workflow]`, `[train]` and `[serve]` gets its own venv holding only what pip resolves
for it (no system site packages, nothing from the dev venv), from a wheel of this checkout:

    (none)     vicunaflow --version, synth llama, convert
    workflow   snakemake builds vicuna-tiny-all-v1.1 (its rules run `vicunaflow` from that venv)
    train      a 1-step LoRA finetune, with tensorboard logging
    serve      chat --prompts, a model loaded with a device_map, serve + one request

The wheels come from a wheelhouse in pytest's cache (.pytest_cache): the first run downloads them
(~300 MB), later runs install offline. pip skips byte-compiling (--no-compile): a few seconds a venv.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from vicunaflow import BUILTIN_CONVERSATIONS, __version__

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXTRAS = ["none", "workflow", "train", "serve"]
TORCH = "torch==2.13.0"
PIP = [sys.executable, "-m", "pip"]


def run(command: list, env: dict, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built from a copy (a build in place would write build/ into the repo)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    command = [*PIP, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", out, source]
    run(command, env=os.environ.copy())
    (built,) = out.glob("vicunaflow-*.whl")
    return built


@pytest.fixture(scope="module")
def wheelhouse(request, tmp_path_factory, wheel) -> Path:
    """Every wheel that any extra needs; filled from the indexes only when something is missing."""
    cache = request.config.cache  # None under -p no:cacheprovider: download into this run's tmp dir then
    house = Path(cache.mkdir("vicunaflow-install-wheelhouse") if cache else tmp_path_factory.mktemp("wheelhouse"))
    command = [*PIP, "download", "--quiet", "--dest", house, "--find-links", house, TORCH]
    command.append(f"{wheel}[{','.join(e for e in EXTRAS if e != 'none')}]")
    offline = subprocess.run([*map(str, command), "--no-index"], capture_output=True, text=True, timeout=300)
    if offline.returncode != 0:
        run(command, env=os.environ.copy(), timeout=900)
    return house


def clean_env(venv: Path) -> dict:
    """The venv first on PATH, nothing of the test's own Python visible."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")}
    return {**keep, "PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def install(extra: str, root: Path, wheel: Path, wheelhouse: Path) -> tuple[Path, float]:
    venv = root / f"venv-{extra}"
    started = time.monotonic()
    run([sys.executable, "-m", "venv", "--without-pip", venv], env=os.environ.copy())
    requirement = str(wheel) if extra == "none" else f"{wheel}[{extra}]"
    command = [*PIP, "--python", venv / "bin" / "python", "install", "--quiet", "--no-compile", "--no-index"]
    run([*command, "--find-links", wheelhouse, TORCH, requirement], env=os.environ.copy())
    return venv, time.monotonic() - started


@pytest.fixture(scope="module")
def venvs(tmp_path_factory, wheel, wheelhouse) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("venvs")
    with ThreadPoolExecutor(len(EXTRAS)) as pool:
        done = dict(zip(EXTRAS, pool.map(lambda e: install(e, root, wheel, wheelhouse), EXTRAS), strict=True))
    print({extra: f"{seconds:.0f} s" for extra, (_, seconds) in done.items()})
    yield {extra: venv for extra, (venv, _) in done.items()}
    shutil.rmtree(root, ignore_errors=True)  # ~4 GB; pytest would keep it with its last three runs


def installed(venv: Path) -> set[str]:
    """Names of the distributions in a venv's site-packages."""
    infos = (venv / "lib").glob("python3*/site-packages/*.dist-info")
    return {info.name.split("-")[0].lower().replace("_", "-") for info in infos}


def test_extras_are_separate(venvs) -> None:
    """Each venv holds its extra and no other: a dependency one extra misses cannot hide behind another."""
    marks = {"workflow": "snakemake", "train": "peft", "serve": "fastapi"}
    for extra, venv in venvs.items():
        names = installed(venv)
        assert "vicunaflow" in names and "torch" in names, (extra, sorted(names))
        for other, mark in marks.items():
            assert (mark in names) == (other == extra), (extra, mark)


def test_core_alone(venvs, tmp_path) -> None:
    venv = venvs["none"]
    env = clean_env(venv)
    assert run(["vicunaflow", "--version"], env).stdout == f"vicunaflow {__version__}\n"
    raw = tmp_path / "pyllama_data"
    run(["vicunaflow", "synth", "llama", "--folder", raw, "--model-size", "tiny"], env)
    run(["vicunaflow", "convert", "--input-dir", raw / "tiny", "--output-dir", tmp_path / "llama-tiny-hf"], env)
    assert (tmp_path / "llama-tiny-hf" / "config.json").is_file()


def test_workflow_alone(venvs, tmp_path) -> None:
    venv = venvs["workflow"]
    env = clean_env(venv)
    (tmp_path / "config").symlink_to(REPO / "config")
    command = ["snakemake", "-s", REPO / "Snakefile", "-d", tmp_path, "--cores", "2", "vicuna-tiny-all-v1.1"]
    run([*command, "--configfile", REPO / "config" / "demo.yaml"], env, timeout=600)
    assert (tmp_path / "vicuna-tiny-all-v1.1" / "config.json").is_file()


def test_train_alone(venvs, tiny_vicuna, tmp_path) -> None:
    env = clean_env(venvs["train"])
    out = tmp_path / "lora"
    command = ["vicunaflow", "finetune", "--model-path", tiny_vicuna, "--data", BUILTIN_CONVERSATIONS]
    command += ["--output-dir", out, "--method", "lora", "--max-steps", "1", "--model-max-length", "128"]
    command += ["--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "1", "--bf16", "false"]
    run(command, env, timeout=600)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list(out.rglob("events.out.tfevents.*")), "no tensorboard log"


def test_serve_alone(venvs, tiny_vicuna, tmp_path) -> None:
    venv = venvs["serve"]
    env = clean_env(venv)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who are you?\n")
    output = tmp_path / "chat.json"
    command = ["vicunaflow", "chat", "--model-path", tiny_vicuna, "--prompts", prompts, "--output", output]
    run([*command, "--temperature", "0", "--max-new-tokens", "8"], env)
    assert json.loads(output.read_text())
    # The serve extra brings accelerate, without which transformers refuses any device_map (what chat and
    # serve --num-gpus loaded through before the engine/ rewrite; drop both if the extra drops accelerate).
    load = f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tiny_vicuna)!r}, device_map='cpu')"
    run(["python", "-c", load], env)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["vicunaflow", "serve", "--model-path", str(tiny_vicuna), "--port", str(port), "--max-context", "256"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert server.poll() is None, server.stdout.read().decode(errors="replace")
        body = {"model": tiny_vicuna.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.terminate()
        server.wait(timeout=30)
