"""Output directories that are either complete or absent, each with a provenance manifest.

Every verb that writes a model or dataset directory goes through `atomic_output_dir`: it writes
into a hidden temporary sibling and renames it into place only after success, so a crash, an
error or Ctrl-C never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import vicunaflow

MANIFEST = "vicunaflow.json"


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise vicunaflow.VicunaflowError(f"{target} exists; remove it or choose another output directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.rename(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    return _hash_file(hashlib.sha256(), path, chunk)


def md5_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """md5 as `md5sum` prints it: Meta's checklist.chk files use it."""
    return _hash_file(hashlib.md5(), path, chunk)


def _hash_file(digest, path: str | os.PathLike, chunk: int) -> str:
    """Stream the file in `chunk`-byte blocks so multi-GB shards never sit in memory whole."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"vicunaflow": vicunaflow.__version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "tokenizers", "sentencepiece", "huggingface_hub", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return versions


def write_manifest(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), **extra) -> dict:
    """Write `vicunaflow.json`: the command, tool versions and sha256 of the given input files.

    Input sha256 sums make provenance checkable ("which delta was this merged from?").
    The timestamp is deliberately left out so identical inputs give identical bytes.
    """
    manifest = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "versions": tool_versions(),
        "inputs": {str(p): sha256_file(p) for p in sorted(map(str, inputs))},
        **extra,
    }
    Path(out_dir, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
