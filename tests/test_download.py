"""download: real HTTP servers on 127.0.0.1 (a pyllama/Meta-style mirror of the tiny checkpoint with fault
injection, and a small Hugging Face Hub stand-in), never the internet."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from fake_hub import serve  # tests/ is on sys.path

from vicunaflow import VicunaflowError
from vicunaflow.download import (
    download_hf,
    download_llama,
    parse_checklist,
    parse_model_sizes,
    redact_url,
    safe_name,
)

SECRET_POLICY = "eyJTdGF0ZW1lbnQiOlt7InNlY3JldCI6dHJ1ZX1dfQ__"
SECRET_SIGNATURE = "Sig-Abc123~Secret"
FAST = {"retry_wait": 0.01, "timeout": 10.0}


# ---- a pyllama / Meta style mirror ---------------------------------------------------------------


@dataclass
class Seen:
    path: str
    query: str
    headers: dict


@dataclass
class Mirror:
    """Serves `root` under /llama/; `faults[path]` lists one-shot faults: cut, 500, 404."""

    root: Path
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    faults: dict[str, list[str]] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)  # served with one byte flipped, every time
    overrides: dict[str, bytes] = field(default_factory=dict)  # served instead of the file
    required_query: str | None = None  # Meta's signed URL: anything else gets 403

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/llama"

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        mirror: Mirror = self.server.mirror
        url = urlsplit(self.path)
        rel = unquote(url.path).removeprefix("/llama/")
        mirror.requests.append(Seen(rel, url.query, dict(self.headers)))
        if mirror.required_query is not None and url.query != mirror.required_query:
            return self._status(403)
        fault = mirror.faults.get(rel, []).pop(0) if mirror.faults.get(rel) else None
        if fault == "500":
            return self._status(500)
        file = mirror.root / rel
        if rel in mirror.overrides:
            data = mirror.overrides[rel]
        elif fault == "404" or not file.is_file():
            return self._status(404)
        else:
            data = file.read_bytes()
        if rel in mirror.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if fault == "cut":
            # Half the body, then the connection drops (the client saw the full Content-Length).
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _status(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_raw) -> Path:
    """The tiny checkpoint in pyllama's layout, plus a Llama 2 style folder and Meta's license files."""
    root = tmp_path_factory.mktemp("release")
    shutil.copytree(tiny_raw, root / "tiny")
    if (root / "tiny" / "tokenizer.model").exists():  # synth keeps it in the size folder; Meta at the root
        (root / "tiny" / "tokenizer.model").rename(root / "tokenizer.model")
        lines = (root / "tiny" / "checklist.chk").read_text().splitlines(keepends=True)
        (root / "tiny" / "checklist.chk").write_text("".join(x for x in lines if not x.endswith(" tokenizer.model\n")))
    if not (root / "tokenizer_checklist.chk").exists():
        md5 = hashlib.md5((root / "tokenizer.model").read_bytes()).hexdigest()
        (root / "tokenizer_checklist.chk").write_text(f"{md5}  tokenizer.model\n")
    shutil.copytree(root / "tiny", root / "llama-2-7b")
    (root / "LICENSE").write_text("LLAMA 2 COMMUNITY LICENSE (test copy)\n")
    (root / "USE_POLICY.md").write_text("Acceptable use (test copy)\n")
    return root


@pytest.fixture
def mirror(release):
    state = Mirror(release)
    server = serve(MirrorHandler, state)
    server.mirror = state
    yield state
    server.shutdown()
    server.server_close()


def _same_tree(got: Path, want: Path, names) -> None:
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vicunaflow", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VICUNAFLOW_LOG_LEVEL": "INFO", **(env or {})},
    )


TINY_FILES = ["params.json", "checklist.chk", "consolidated.00.pth", "consolidated.01.pth"]


def test_cut_connection_and_500_are_retried_and_resumed_with_range(mirror, release, tmp_path):
    mirror.faults = {"tiny/consolidated.00.pth": ["cut"], "tiny/params.json": ["500"]}
    out = download_llama(
        model_size="tiny",
        folder=tmp_path / "pyllama_data",
        base_url=mirror.base_url,
        staging_dir=tmp_path / "st",
        **FAST,
    )
    assert out == tmp_path / "pyllama_data" / "tiny"
    _same_tree(out, release / "tiny", TINY_FILES)
    _same_tree(tmp_path / "pyllama_data", release, ["tokenizer.model", "tokenizer_checklist.chk"])
    shard = mirror.seen("tiny/consolidated.00.pth")
    assert len(shard) == 2 and "Range" not in shard[0].headers
    size = (release / "tiny" / "consolidated.00.pth").stat().st_size
    start = int(re.fullmatch(r"bytes=(\d+)-", shard[1].headers["Range"]).group(1))
    assert 0 < start < size  # continued where the cut left it, not from zero
    assert len(mirror.seen("tiny/params.json")) == 2
    manifest = json.loads((out / "vicunaflow.json").read_text())
    assert (
        manifest["files"]["consolidated.01.pth"]
        == parse_checklist((release / "tiny" / "checklist.chk").read_text(), "x")["consolidated.01.pth"]
    )
    assert not list((tmp_path / "st").rglob("*.part")), "staging is emptied after success"


def test_partial_file_from_an_earlier_run_is_continued(mirror, release, tmp_path):
    shard = release / "tiny" / "consolidated.01.pth"
    md5 = hashlib.md5(shard.read_bytes()).hexdigest()
    staging = tmp_path / "st"
    (staging / "llama").mkdir(parents=True)
    half = shard.read_bytes()[: shard.stat().st_size // 3]
    (staging / "llama" / f"{md5}.part").write_bytes(half)
    download_llama(
        model_size="tiny",
        folder=tmp_path / "out",
        base_url=mirror.base_url,
        staging_dir=staging,
        include_tokenizer=False,
        **FAST,
    )
    (request,) = mirror.seen("tiny/consolidated.01.pth")
    assert request.headers["Range"] == f"bytes={len(half)}-"
    assert (tmp_path / "out" / "tiny" / "consolidated.01.pth").read_bytes() == shard.read_bytes()
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_corrupt_file_fails_the_command_and_is_set_aside(mirror, release, tmp_path):
    mirror.corrupt = {"tiny/consolidated.01.pth"}
    folder, staging = tmp_path / "pyllama_data", tmp_path / "st"
    result = _run_cli(
        "download", "llama", "--model-size", "tiny", "--folder", str(folder), "--base-url", mirror.base_url,
        "--staging-dir", str(staging), "--retry-wait", "0.01",
    )  # fmt: skip
    assert result.returncode != 0
    expected = hashlib.md5((release / "tiny" / "consolidated.01.pth").read_bytes()).hexdigest()
    served = bytearray((release / "tiny" / "consolidated.01.pth").read_bytes())
    served[0] ^= 0xFF
    actual = hashlib.md5(served).hexdigest()
    assert "tiny/consolidated.01.pth" in result.stderr
    assert expected in result.stderr and actual in result.stderr
    assert not (folder / "tiny").exists(), "nothing that looks finished"
    (aside,) = (staging / "llama" / "corrupt").glob("*.corrupt")
    assert aside.read_bytes() == bytes(served)
    # The good shard stays staged (whole, or partial if the failure stopped it): a rerun against a
    # fixed mirror never fetches it from byte 0 again.
    mirror.corrupt = set()
    before = len(mirror.seen("tiny/consolidated.00.pth"))
    download_llama(model_size="tiny", folder=folder, base_url=mirror.base_url, staging_dir=staging, **FAST)
    assert all("Range" in r.headers for r in mirror.seen("tiny/consolidated.00.pth")[before:])
    _same_tree(folder / "tiny", release / "tiny", TINY_FILES)


def test_404_names_the_url_and_suggests_local(mirror, tmp_path):
    with pytest.raises(VicunaflowError) as err:
        download_llama(model_size="13B", folder=tmp_path, base_url=mirror.base_url, staging_dir=tmp_path / "st", **FAST)
    message = str(err.value)
    assert f"{mirror.base_url}/13B/checklist.chk" in message and "404" in message and "--source local" in message
    # download llama's own hint, as before eval download got its own (FetchFailed)
    assert message.endswith(
        "not found (HTTP 404); check the URL and the model size, or use --source local --path DIR with files you "
        "already have"
    ), message
    mirror.faults = {"tiny/consolidated.00.pth": ["404"]}
    with pytest.raises(VicunaflowError, match=r"tiny/consolidated\.00\.pth: not found.*--source local"):
        download_llama(
            model_size="tiny", folder=tmp_path, base_url=mirror.base_url, staging_dir=tmp_path / "st", **FAST
        )
    assert not (tmp_path / "tiny").exists()


def test_unreachable_network_gives_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(VicunaflowError) as err:
        download_llama(
            model_size="tiny", folder=tmp_path, base_url=f"http://127.0.0.1:{port}/m", staging_dir=tmp_path / "st",
            retries=1, **FAST,
        )  # fmt: skip
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/m/tokenizer_checklist.chk" in message and "--source local" in message
    assert message.endswith(
        "; check the network and the URL, or fetch the files another way and use --source local --path DIR"
    ), message


def test_meta_signed_url_works_and_its_query_string_is_never_printed(mirror, release, tmp_path):
    mirror.required_query = f"Policy={SECRET_POLICY}&Signature={SECRET_SIGNATURE}&Key-Pair-Id=K15"
    mirror.faults = {"llama-2-7b/consolidated.01.pth": ["cut"], "tiny/params.json": ["500"]}
    signed = f"http://127.0.0.1:{mirror.port}/llama/*?{mirror.required_query}"
    folder = tmp_path / "pyllama_data"
    result = _run_cli(
        "download", "llama", "--source", "meta", "--model-size", "tiny,llama-2-7b", "--folder", str(folder),
        "--staging-dir", str(tmp_path / "st"), "--retry-wait", "0.01", env={"LLAMA_SIGNED_URL": signed},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert all(r.query == mirror.required_query for r in mirror.requests)
    assert "retry" in result.stderr  # the faults were logged ...
    for secret in (SECRET_POLICY, SECRET_SIGNATURE, "Key-Pair-Id"):  # ... without the query string
        assert secret not in result.stderr + result.stdout
        assert secret not in (folder / "llama-2-7b" / "vicunaflow.json").read_text()
    _same_tree(folder / "llama-2-7b", release / "tiny", TINY_FILES)
    _same_tree(folder / "llama-2-7b", release, ["LICENSE", "USE_POLICY.md"])
    _same_tree(folder / "tiny", release / "tiny", TINY_FILES)

    # An expired URL (403) and a signed URL on the command line: errors and logs stay clean too.
    mirror.required_query = "Policy=other"
    result = _run_cli(
        "download", "llama", "--source", "meta", "--model-size", "tokenizer", "--folder", str(tmp_path / "x"),
        "--url", signed, "--staging-dir", str(tmp_path / "st"),
    )  # fmt: skip
    assert result.returncode != 0 and "403" in result.stderr
    assert (
        "access denied (HTTP 403); Meta's signed URLs expire after a day and allow few downloads: request a new "
        "one, or use --source local --path DIR" in result.stderr
    ), result.stderr
    assert SECRET_POLICY not in result.stderr and SECRET_SIGNATURE not in result.stderr


def test_meta_url_needs_one_star(tmp_path):
    with pytest.raises(VicunaflowError, match=r"one '\*'") as err:
        download_llama(source="meta", url="https://example.org/x?Policy=SECRETVALUE", folder=tmp_path)
    assert "SECRETVALUE" not in str(err.value)


@pytest.mark.parametrize("entry", ["../escape.pth", "/tmp/escape.pth", "sub/../../escape.pth", "..\\escape.pth"])
def test_checklist_entries_outside_the_folder_are_refused(mirror, tmp_path, entry):
    good = (mirror.root / "tiny" / "checklist.chk").read_text()
    mirror.overrides = {"tiny/checklist.chk": (good + f"{'0' * 32}  {entry}\n").encode()}
    folder = tmp_path / "deep" / "pyllama_data"
    with pytest.raises(VicunaflowError, match="refusing"):
        download_llama(model_size="tiny", folder=folder, base_url=mirror.base_url, staging_dir=tmp_path / "st", **FAST)
    assert not list(tmp_path.rglob("escape.pth"))
    assert not (folder / "tiny").exists()


def test_tokenizer_only(mirror, release, tmp_path):
    download_llama(model_size="tokenizer", folder=tmp_path, base_url=mirror.base_url, staging_dir=tmp_path / "st")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "st") == [
        "tokenizer.model",
        "tokenizer_checklist.chk",
    ]
    _same_tree(tmp_path, release, ["tokenizer.model", "tokenizer_checklist.chk"])


def test_local_source_verifies_and_links(release, tmp_path):
    out = download_llama(source="local", path=release, model_size="tiny", folder=tmp_path / "pyllama_data")
    for name in TINY_FILES:
        got, want = out / name, release / "tiny" / name
        assert got.read_bytes() == want.read_bytes()
        if name != "checklist.chk":
            assert got.is_symlink() or got.stat().st_ino == want.stat().st_ino, f"{name} is a copy, not a link"
    assert (out / "tokenizer.model").read_bytes() == (release / "tokenizer.model").read_bytes()
    assert json.loads((out / "vicunaflow.json").read_text())["source"] == f"local:{(release / 'tiny').resolve()}"

    # A damaged copy: the error names the file, the expected and the actual md5; nothing is written.
    damaged = tmp_path / "damaged"
    shutil.copytree(release / "tiny", damaged / "tiny")
    shard = damaged / "tiny" / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(data)
    expected = hashlib.md5((release / "tiny" / "consolidated.01.pth").read_bytes()).hexdigest()
    with pytest.raises(VicunaflowError) as err:
        download_llama(source="local", path=damaged, model_size="tiny", folder=tmp_path / "other", link=False)
    assert (
        str(shard) in str(err.value) and expected in str(err.value) and hashlib.md5(data).hexdigest() in str(err.value)
    )
    assert not (tmp_path / "other" / "tiny").exists()


@pytest.mark.parametrize("size", ["7B", "llama-2-13b"])
def test_local_copy_of_another_size_is_refused(release, tmp_path, size):
    """The tiny folder given as 7B was placed as pyllama_data/7B with a warning, to be converted as llama-7b-hf."""
    with pytest.raises(VicunaflowError) as err:
        download_llama(source="local", path=release / "tiny", model_size=size, folder=tmp_path / "pyllama_data")
    assert f"{release / 'tiny' / 'params.json'}: dim 256, 4 layers: not the {size} release" in str(err.value)
    assert ("give --model-size tiny" if size == "7B" else f"--path the {size} folder") in str(err.value)
    assert not (tmp_path / "pyllama_data" / size).exists()


def test_a_user_folder_in_the_way_is_refused_before_anything_is_downloaded(mirror, release, tmp_path):
    folder = tmp_path / "pyllama_data"
    (folder / "tiny").mkdir(parents=True)
    (folder / "tiny" / "notes.txt").write_text("mine\n")
    fetch = {"model_size": "tiny", "folder": folder, "base_url": mirror.base_url, "staging_dir": tmp_path / "st"}
    with pytest.raises(VicunaflowError, match=r"tiny exists and is not a complete vicunaflow output.*--overwrite"):
        download_llama(**fetch, **FAST)
    assert (folder / "tiny" / "notes.txt").read_text() == "mine\n"
    assert not mirror.seen("tiny/consolidated.00.pth"), "refused before the download"

    # pyllama's own download, verified but without vicunaflow.json: already done, kept as it is.
    shutil.rmtree(folder / "tiny")
    shutil.copytree(release / "tiny", folder / "tiny", ignore=shutil.ignore_patterns("vicunaflow.json"))
    assert download_llama(**fetch, **FAST) == folder / "tiny"
    assert not (folder / "tiny" / "vicunaflow.json").exists()

    (folder / "tiny" / "params.json").write_text("{}")  # damaged: replaced only when asked
    with pytest.raises(VicunaflowError, match="--overwrite"):
        download_llama(**fetch, **FAST)
    download_llama(**fetch, **FAST, overwrite=True)
    _same_tree(folder / "tiny", release / "tiny", TINY_FILES)


def test_model_size_names():
    assert parse_model_sizes("7b,13B, 33b ,65B") == (False, ["7B", "13B", "30B", "65B"])
    assert parse_model_sizes("tokenizer") == (True, [])
    assert parse_model_sizes("llama-2-70b,tiny,tiny") == (False, ["llama-2-70b", "tiny"])
    for bad in ("../etc", "8B", ""):
        with pytest.raises(VicunaflowError):
            parse_model_sizes(bad)


def test_checklist_parsing_and_redaction():
    text = "d41d8cd98f00b204e9800998ecf8427e  params.json\nD41D8CD98F00B204E9800998ECF8427E *consolidated.00.pth\n"
    assert parse_checklist(text, "c") == {
        "params.json": "d41d8cd98f00b204e9800998ecf8427e",
        "consolidated.00.pth": "d41d8cd98f00b204e9800998ecf8427e",
    }
    with pytest.raises(VicunaflowError, match="line 1"):
        parse_checklist("not a checklist\n", "c")
    assert safe_name("./params.json", "c") == "params.json"
    assert redact_url("https://user:pw@host.org:8443/a/*?Policy=x&Signature=y#f") == "https://host.org:8443/a/*"


def test_cli_help_lists_the_download_options():
    result = _run_cli("download", "llama", "--help")
    assert result.returncode == 0
    for flag in ("--model_size", "--source", "--base_url", "--url_env", "--include_tokenizer", "--staging_dir"):
        assert flag in result.stdout


# ---- a Hugging Face Hub stand-in (tests/fake_hub.py) ------------------------------------------------


OLD, NEW = "a" * 40, "b" * 40
DELTA = "lmsys/vicuna-tiny-delta-v1.1"


@pytest.fixture
def hub(fake_hub):
    return fake_hub(
        repos={
            DELTA: {
                "refs": {"main": NEW, "v1.1": OLD},
                "commits": {
                    OLD: {"config.json": b'{"v": 1}', "pytorch_model-00001-of-00001.bin": b"old weights" * 100},
                    NEW: {
                        "config.json": b'{"v": 2}',
                        "pytorch_model-00001-of-00001.bin": b"new weights" * 100,
                        "tokenizer.model": b"spm",
                        "sub/readme.txt": b"nested",
                    },
                },
            }
        }
    )


def _hf(hub, tmp_path, name="delta", **kwargs):
    return download_hf(repo=DELTA, local_dir=tmp_path / name, endpoint=hub.url, staging_dir=tmp_path / "st", **kwargs)


def test_hf_revision_pin_is_fetched_and_recorded(hub, tmp_path):
    pinned = _hf(hub, tmp_path, "pinned", revision="v1.1")
    assert (pinned / "config.json").read_bytes() == b'{"v": 1}'
    assert (pinned / "pytorch_model-00001-of-00001.bin").read_bytes() == b"old weights" * 100
    manifest = json.loads((pinned / "vicunaflow.json").read_text())
    assert (manifest["repo"], manifest["revision"], manifest["requested_revision"]) == (DELTA, OLD, "v1.1")
    assert sorted(p.name for p in pinned.iterdir()) == sorted(
        ["config.json", "pytorch_model-00001-of-00001.bin", "vicunaflow.json"]
    )

    latest = _hf(hub, tmp_path, "latest")
    assert (latest / "config.json").read_bytes() == b'{"v": 2}'
    assert (latest / "sub" / "readme.txt").read_bytes() == b"nested"
    assert json.loads((latest / "vicunaflow.json").read_text())["revision"] == NEW
    assert not list((tmp_path / "st").rglob("*.bin")), "staging is emptied after success"

    by_commit = _hf(hub, tmp_path, "by-commit", revision=OLD, include=["*.json"])
    assert sorted(p.name for p in by_commit.iterdir()) == ["config.json", "vicunaflow.json"]


def test_hf_errors_are_clear(hub, tmp_path):
    with pytest.raises(VicunaflowError, match="revision 'v9' not found"):
        _hf(hub, tmp_path, revision="v9")
    with pytest.raises(VicunaflowError, match="repository not found"):
        download_hf(repo="nobody/nothing", local_dir=tmp_path / "x", endpoint=hub.url, staging_dir=tmp_path / "st")
    with pytest.raises(VicunaflowError, match="no file matches"):
        _hf(hub, tmp_path, include=["*.safetensors"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(VicunaflowError, match=r"cannot be reached.*--source local"):
        download_hf(repo=DELTA, local_dir=tmp_path / "x", endpoint=closed, staging_dir=tmp_path / "st")
    assert not (tmp_path / "x").exists() and not (tmp_path / "delta").exists()


def test_hf_tampered_file_fails_and_is_set_aside(hub, tmp_path):
    hub.tampered = {"pytorch_model-00001-of-00001.bin"}
    with pytest.raises(VicunaflowError, match=r"pytorch_model-00001-of-00001\.bin: sha256 mismatch") as err:
        _hf(hub, tmp_path)
    assert hashlib.sha256(b"new weights" * 100).hexdigest() in str(err.value)
    assert not (tmp_path / "delta").exists()
    assert list((tmp_path / "st").rglob("*.corrupt"))


def test_hf_token_from_env_is_used_and_never_logged(hub, tmp_path, monkeypatch, caplog):
    hub.token = "hf_SECRETtoken123"
    with pytest.raises(VicunaflowError, match=r"set \$HF_TEST_TOKEN"):
        _hf(hub, tmp_path, token_env="HF_TEST_TOKEN")
    monkeypatch.setenv("HF_TEST_TOKEN", hub.token)
    with caplog.at_level(logging.DEBUG):
        _hf(hub, tmp_path, token_env="HF_TEST_TOKEN")
    assert hub.token not in caplog.text and "$HF_TEST_TOKEN" in caplog.text
    assert hub.token not in (tmp_path / "delta" / "vicunaflow.json").read_text()


def test_hf_offline_uses_the_cache_with_the_pinned_revision(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    cache = tmp_path / "hf-cache"
    snapshot_download(DELTA, revision="v1.1", cache_dir=cache, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    out = _hf(hub, tmp_path, revision="v1.1")
    assert len(hub.requests) == seen, "offline: no request reached the hub"
    assert (out / "config.json").read_bytes() == b'{"v": 1}'
    assert json.loads((out / "vicunaflow.json").read_text())["revision"] == OLD
    only_json = _hf(hub, tmp_path, "only-json", revision="v1.1", include=["*.json"])
    assert sorted(p.name for p in only_json.iterdir()) == ["config.json", "vicunaflow.json"]
    with pytest.raises(VicunaflowError, match="not available offline"):
        _hf(hub, tmp_path, "other", revision="main")


def test_hf_two_runs_fetching_other_files_of_one_commit_do_not_undo_each_other(tmp_path):
    """Two `data fetch`es of one dataset repository (snakemake -j2): the first to finish must not remove the
    files the other is still downloading."""
    import threading

    from fake_hub import Hub, HubHandler

    from vicunaflow.dataprep.sources import fetch

    commit = "e" * 40
    big_started, small_done = threading.Event(), threading.Event()

    class BigFileWaits(HubHandler):
        def _route(self, body):
            if body and self.command == "GET" and "/resolve/" in self.path and "big.json" in self.path:
                big_started.set()
                small_done.wait(30)  # big.json is still downloading while the other run finishes
            return super()._route(body)

    files = {"big.json": b'{"big": true}' * 1000, "small.json": b'{"small": true}'}
    state = Hub(repos={"o/ds": {"refs": {"main": commit}, "commits": {commit: files}}}, repo_type="dataset")
    server = serve(BigFileWaits, state)
    server.hub = state
    common = {"repo": "o/ds", "revision": commit, "endpoint": state.url, "staging_dir": tmp_path / "st"}
    failures = []

    def fetch_big():
        try:
            fetch(file="big.json", output_dir=tmp_path / "raw-big", **common)
        except Exception as err:
            failures.append(err)

    big = threading.Thread(target=fetch_big)
    try:
        big.start()
        assert big_started.wait(30)
        fetch(file="small.json", output_dir=tmp_path / "raw-small", **common)
        small_done.set()
        big.join(60)
    finally:
        small_done.set()
        server.shutdown()
        server.server_close()
    assert not failures, failures
    assert (tmp_path / "raw-big" / "big.json").read_bytes() == files["big.json"]
    assert (tmp_path / "raw-small" / "small.json").read_bytes() == files["small.json"]
    assert not list((tmp_path / "st").rglob("*.json")), "each stage is removed by the run that used it"


def test_hf_two_runs_of_the_same_fetch_take_turns_with_its_stage(tmp_path):
    import threading

    from vicunaflow.download.hub import _stage_in_use

    stage, order = tmp_path / "st" / "commit--files", []

    def second_run():
        with _stage_in_use(stage):
            order.append("second")

    with _stage_in_use(stage):
        waiting = threading.Thread(target=second_run)
        waiting.start()
        waiting.join(0.5)
        order.append("first done")
    waiting.join(10)
    assert order == ["first done", "second"]
    assert not stage.with_name(stage.name + ".lock").exists(), "the lock file goes with its last holder"


def test_hf_a_rerun_after_a_failure_continues_from_its_stage(hub, tmp_path):
    """The stage is named by what is fetched, not by the run: the files a failed run got are not fetched again."""
    hub.tampered = {"pytorch_model-00001-of-00001.bin"}
    with pytest.raises(VicunaflowError, match="sha256 mismatch"):
        _hf(hub, tmp_path)
    hub.tampered = set()
    seen = len(hub.requests)
    _hf(hub, tmp_path)
    assert "GET /lmsys/vicuna-tiny-delta-v1.1/resolve/" + NEW + "/config.json" not in hub.requests[seen:]
    assert (
        "GET /lmsys/vicuna-tiny-delta-v1.1/resolve/" + NEW + "/pytorch_model-00001-of-00001.bin"
        in (hub.requests[seen:])
    )


def test_hf_a_local_file_error_is_not_blamed_on_the_network(hub, tmp_path, monkeypatch):
    import huggingface_hub

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "st" / "x.incomplete"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", disk_full)
    with pytest.raises(VicunaflowError, match=r"No space left on device.*not a network problem") as err:
        _hf(hub, tmp_path)
    assert "cannot be reached" not in str(err.value) and "--source local" not in str(err.value)
    assert not (tmp_path / "delta").exists()


@pytest.fixture
def go_offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own; calling the fixture's value switches HF_HUB_OFFLINE on."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return lambda: monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hf_offline_refuses_a_cache_that_holds_part_of_the_repository(hub, tmp_path, go_offline):
    """from_pretrained / hf_hub_download cache single files and no file listing: only what the cache can show
    whole is taken; nothing half-complete is written as a finished output."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(DELTA, "config.json", revision=NEW, endpoint=hub.url)
    go_offline()
    with pytest.raises(VicunaflowError, match=r"not available offline.*config\.json.*--include.*online") as err:
        _hf(hub, tmp_path, revision=NEW)
    assert "--source local" in str(err.value)
    with pytest.raises(VicunaflowError, match=r"not available offline.*nothing cached matches \*\.bin"):
        _hf(hub, tmp_path, revision=NEW, include=["*.json", "*.bin"])
    assert not (tmp_path / "delta").exists()
    only_config = _hf(hub, tmp_path, revision=NEW, include=["config.json"])
    assert sorted(p.name for p in only_config.iterdir()) == ["config.json", "vicunaflow.json"]


def test_hf_offline_with_a_cached_listing_names_the_missing_files(hub, tmp_path, go_offline):
    from huggingface_hub import snapshot_download

    snapshot_download(DELTA, revision=NEW, allow_patterns=["*.json"], endpoint=hub.url)  # caches the listing
    go_offline()
    with pytest.raises(VicunaflowError, match=r"not available offline.*3 of the 4 requested.*pytorch_model") as err:
        _hf(hub, tmp_path, revision=NEW)
    assert "sub/readme.txt" in str(err.value) and "tokenizer.model" in str(err.value)
    assert not (tmp_path / "delta").exists()


def test_hf_offline_refuses_a_sharded_checkpoint_missing_a_shard(fake_hub, tmp_path, go_offline):
    from huggingface_hub import hf_hub_download

    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {
        "config.json": b"{}",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": b"one",
        "model-00002-of-00002.safetensors": b"two",
    }
    sharded = fake_hub(repos={"o/sharded": {"refs": {"main": NEW}, "commits": {NEW: files}}})
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        hf_hub_download("o/sharded", name, revision=NEW, endpoint=sharded.url)
    go_offline()
    with pytest.raises(VicunaflowError, match=r"not available offline.*shards.*model-00002-of-00002\.safetensors"):
        download_hf(
            repo="o/sharded",
            revision=NEW,
            include=["*.json", "*.safetensors"],
            local_dir=tmp_path / "model",
            staging_dir=tmp_path / "st",
        )
    assert not (tmp_path / "model").exists()


def test_data_fetch_offline_of_a_file_not_cached_says_so(fake_hub, tmp_path, go_offline):
    from huggingface_hub import hf_hub_download

    from vicunaflow.dataprep.sources import fetch

    files = {"data/train.jsonl": b'{"id": "t"}', "README.md": b"x"}
    datasets = fake_hub(repos={"o/ds": {"refs": {"main": NEW}, "commits": {NEW: files}}}, repo_type="dataset")
    hf_hub_download("o/ds", "README.md", repo_type="dataset", revision=NEW, endpoint=datasets.url)
    go_offline()
    with pytest.raises(VicunaflowError, match=r"not available offline.*data/train\.jsonl.*data clean") as err:
        fetch(
            repo="o/ds", file="data/train.jsonl", revision=NEW, output_dir=tmp_path / "raw", staging_dir=tmp_path / "st"
        )
    assert "No such file" not in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_hf_local_source_checks_recorded_hashes(hub, tmp_path):
    fetched = _hf(hub, tmp_path)
    linked = download_hf(source="local", path=fetched, local_dir=tmp_path / "linked")
    assert (linked / "config.json").read_bytes() == b'{"v": 2}'
    assert json.loads((linked / "vicunaflow.json").read_text())["revision"] == NEW
    (fetched / "config.json").unlink()
    (fetched / "config.json").write_bytes(b'{"v": 3}')
    with pytest.raises(VicunaflowError, match=r"config\.json: git-sha1 mismatch"):
        download_hf(source="local", path=fetched, local_dir=tmp_path / "again")


# ---- through the workflow: the lead's download rules call these verbs --------------------------------


@pytest.mark.e2e
def test_workflow_stops_at_a_corrupt_download_and_resumes_after(mirror, release, tmp_path):
    """A corrupt shard fails llama_raw_download and nothing downstream runs; once the mirror is fixed,
    the rerun fetches only the rest (the good shard stayed staged) and conversion follows."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "config").symlink_to(repo / "config")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        yaml.safe_dump({"llama": {"sources": {"tiny": "pyllama"}, "pyllama": {"base_url": mirror.base_url}}})
    )
    command = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path), "--cores", "2"]
    command += ["llama-tiny-hf", "--configfile", str(config)]  # --configfile takes several values: last
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    mirror.corrupt = {"tiny/consolidated.01.pth"}
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert failed.returncode != 0
    assert "md5 mismatch" in (tmp_path / "logs" / "llama_raw" / "tiny.log").read_text()
    assert not (tmp_path / "pyllama_data" / "tiny").exists()
    assert not (tmp_path / "llama-tiny-hf").exists() and not (tmp_path / "logs" / "convert").exists()
    assert list((tmp_path / ".staging" / "llama" / "corrupt").glob("*.corrupt"))

    mirror.corrupt = set()
    seen = len(mirror.seen("tiny/consolidated.00.pth"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all("Range" in r.headers for r in mirror.seen("tiny/consolidated.00.pth")[seen:])
    assert (tmp_path / "llama-tiny-hf" / "config.json").exists()
    _same_tree(tmp_path / "pyllama_data" / "tiny", release / "tiny", TINY_FILES)
