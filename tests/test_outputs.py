"""Output folders: what may be replaced, what is refused, and what a killed run leaves behind.

Every case drives the real CLI (`vicunaflow.cli.main`, or a subprocess where signals are sent)
on the tiny chain of conftest.py, whose folders are read-only to these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vicunaflow import BUILTIN_CONVERSATIONS, VicunaflowError, cli, outputs


def run(*argv) -> int:
    """`vicunaflow <argv>` in this process; its exit status (0, or what it passed to sys.exit)."""
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    return 0


def user_folder(path: Path) -> Path:
    """A folder the user made: a file and a subfolder, no vicunaflow.json."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine\n")
    (path / "sub" / "data.txt").write_text("also mine\n")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "notes.txt").read_text() == "mine\n"
    assert (path / "sub" / "data.txt").read_text() == "also mine\n"


def temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# One conversation `data clean` keeps.
CONVERSATION = '{"id": "a", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}\n'


# ---- an existing folder is replaced only when it is an earlier vicunaflow output -------------------


def test_convert_refuses_to_replace_a_user_folder(tiny_raw, tmp_path, capsys):
    out = user_folder(tmp_path / "existing_out")
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", out) == 1
    assert_untouched(out)
    err = capsys.readouterr().err
    assert f"{out} exists and is not a complete vicunaflow output" in err and "--overwrite" in err
    assert temporaries(tmp_path, "existing_out") == []


def test_overwrite_replaces_a_user_folder(tiny_raw, tiny_hf, tmp_path):
    out = user_folder(tmp_path / "existing_out")
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", out, "--overwrite") == 0
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors.index.json").read_bytes() == (
        tiny_hf / "model.safetensors.index.json"
    ).read_bytes()


def test_an_earlier_output_or_an_empty_folder_is_replaced(tiny_raw, tiny_hf, tmp_path):
    out = tmp_path / "llama-tiny-hf"
    shutil.copytree(tiny_hf, out)
    (out / "model.safetensors.index.json").write_text("{}")  # changed since: the rerun writes it afresh
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", out) == 0
    written = tree(out)
    manifest = json.loads(written.pop(outputs.MANIFEST))
    assert written == {name: data for name, data in tree(tiny_hf).items() if name != outputs.MANIFEST}
    assert manifest["verb"] == "convert" and sorted(manifest["written_files"]) == sorted(written)  # what it wrote
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", empty) == 0
    assert (empty / "config.json").is_file()


def test_another_verbs_output_or_files_added_to_an_output_are_kept(tiny_raw, tiny_hf, tmp_path, capsys):
    """An earlier output is replaced without --overwrite only by the verb that wrote it, and only while it
    holds just what that verb wrote (its manifest lists it): a note the user added keeps the folder."""
    converted = tmp_path / "converted"
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", converted) == 0
    assert run("quantize", "--model-path", tiny_hf, "--output-dir", converted) == 1
    assert "holds the output of `vicunaflow convert`, not of `vicunaflow quantize`" in capsys.readouterr().err
    (converted / "NOTES.md").write_text("mine\n")
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", converted) == 1
    assert "holds files vicunaflow did not write there (NOTES.md)" in capsys.readouterr().err
    assert (converted / "NOTES.md").read_text() == "mine\n" and (converted / "config.json").is_file()
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", converted, "--overwrite") == 0
    assert not (converted / "NOTES.md").exists()


def test_a_manifest_not_written_by_vicunaflow_does_not_count(tiny_raw, tmp_path):
    out = user_folder(tmp_path / "out")
    (out / outputs.MANIFEST).write_text('{"note": "my own file"}\n')
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", out) == 1
    assert_untouched(out)


def test_a_file_in_the_way_is_refused(tiny_raw, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file\n")
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", out) == 1
    assert out.read_text() == "a file\n"


@pytest.mark.parametrize(
    "verb", ["synth llama", "synth delta", "make-delta", "data tokenize", "data fetch", "download hf", "quantize"]
)
def test_every_verb_refuses_to_replace_a_user_folder(verb, tiny_root, tiny_hf, tiny_vicuna, tmp_path, capsys):
    out = user_folder(tmp_path / "out")
    argv = {
        "synth llama": ["synth", "llama", "--folder", tmp_path, "--model-size", "tiny"],
        "synth delta": ["synth", "delta", "--base", tiny_hf, "--output-dir", out],
        "make-delta": ["make-delta", "--base", tiny_hf, "--target", tiny_vicuna, "--delta", out],
        "data tokenize": [
            "data",
            "tokenize",
            "--data",
            BUILTIN_CONVERSATIONS,
            "--model-path",
            tiny_hf,
            "--output-dir",
            out,
        ],
        "download hf": ["download", "hf", "--source", "local", "--path", tiny_hf, "--local-dir", out],
        # refused before any download: nothing listens on the endpoint
        "data fetch": [
            "data",
            "fetch",
            "--repo",
            "a/b",
            "--file",
            "f.json",
            "--revision",
            "c" * 40,
            "--endpoint",
            "http://127.0.0.1:9",
            "--staging-dir",
            tmp_path / "st",
            "--output-dir",
            out,
        ],
        "quantize": ["quantize", "--model-path", tiny_hf, "--output-dir", out],
    }[verb]
    if verb == "synth llama":  # writes <folder>/tiny
        out = user_folder(tmp_path / "tiny")
    assert run(*argv) == 1
    assert_untouched(out)
    assert f"{out} exists and is not a complete vicunaflow output" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["data clean", "data split", "data mix"])
def test_data_verbs_writing_one_file_refuse_a_user_folder_in_its_place(verb, tiny_hf, tmp_path, capsys):
    conversations = tmp_path / "in.jsonl"
    conversations.write_text('{"id": "a", "conversations": [{"from": "human", "value": "q"}]}\n')
    out = user_folder(tmp_path / "out.jsonl")
    argv = {
        "data clean": ["data", "clean", "--data", conversations, "--output", out],
        "data split": ["data", "split", "--data", conversations, "--model-path", tiny_hf, "--output", out],
        "data mix": ["data", "mix", "--data", conversations, "--weights", "[1]", "--output", out],
    }[verb]
    assert run(*argv) == 1
    assert_untouched(out)
    assert f"{out} is a directory; give a file path" in capsys.readouterr().err
    assert temporaries(tmp_path, "out.jsonl") == []


def test_fetch_overwrite_replaces_a_user_folder(fake_hub, tmp_path):
    hub = fake_hub(repos={"a/b": {"refs": {"main": "c" * 40}, "commits": {"c" * 40: {"f.json": b"[]"}}}},
                   repo_type="dataset")  # fmt: skip
    out = user_folder(tmp_path / "out")
    argv = ["data", "fetch", "--repo", "a/b", "--file", "f.json", "--revision", "c" * 40, "--endpoint", hub.url,
            "--staging-dir", tmp_path / "st", "--output-dir", out]  # fmt: skip
    assert run(*argv, "--overwrite") == 0
    assert (out / "f.json").read_bytes() == b"[]" and not (out / "notes.txt").exists()
    assert run(*argv) == 0, "its own earlier output is replaced without --overwrite"
    assert run(*argv[:-1], tmp_path / "st" / "out") == 1, "an output inside the staging folder is refused"


def test_download_llama_refuses_to_replace_a_user_folder(tiny_raw, tmp_path):
    out = user_folder(tmp_path / "pyllama_data" / "tiny")
    argv = ["download", "llama", "--source", "local", "--path", tiny_raw, "--model-size", "tiny"]
    assert run(*argv, "--folder", tmp_path / "pyllama_data") == 1
    assert_untouched(out)


def test_finetune_refuses_before_training(tiny_hf, tmp_path, capsys):
    out = user_folder(tmp_path / "out")
    argv = ["finetune", "--model-path", tiny_hf, "--data", BUILTIN_CONVERSATIONS, "--output-dir", out]
    assert run(*argv, "--max-steps", "1", "--report-to", "none") == 1
    assert_untouched(out)
    err = capsys.readouterr().err
    assert f"{out} exists and is not a complete vicunaflow output" in err
    assert "finetune: {" not in err  # refused before the run started
    assert not (tmp_path / ".checkpoints").exists()


# ---- outputs that would destroy an input, the working directory or a root --------------------------


def test_output_that_is_the_input_is_refused_even_with_overwrite(tiny_raw, tmp_path, capsys):
    raw = tmp_path / "pyllama_data" / "tiny"
    shutil.copytree(tiny_raw, raw)
    before = tree(raw)
    assert run("convert", "--input-dir", raw, "--output-dir", raw, "--overwrite") == 1
    assert tree(raw) == before
    assert f"refusing to write the output {raw}: it is the input {raw}" in capsys.readouterr().err


def test_output_that_contains_the_input_is_refused(tiny_raw, tmp_path, capsys):
    folder = tmp_path / "pyllama_data"
    shutil.copytree(tiny_raw, folder / "tiny")
    (folder / "notes.txt").write_text("mine\n")
    before = tree(folder)
    assert run("convert", "--input-dir", folder / "tiny", "--output-dir", folder, "--overwrite") == 1
    assert tree(folder) == before
    assert f"refusing to write the output {folder}: it contains the input {folder / 'tiny'}" in capsys.readouterr().err


def test_output_inside_the_input_is_refused(tiny_raw, tmp_path, capsys):
    raw = tmp_path / "tiny"
    shutil.copytree(tiny_raw, raw)
    assert run("convert", "--input-dir", raw, "--output-dir", raw / "hf") == 1
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in tiny_raw.iterdir())
    assert f"it lies inside the input {raw}" in capsys.readouterr().err


def test_output_through_a_symlink_or_dotdot_is_still_the_input(tiny_raw, tmp_path):
    raw = tmp_path / "data" / "tiny"
    shutil.copytree(tiny_raw, raw)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    before = tree(raw)
    assert run("convert", "--input-dir", raw, "--output-dir", tmp_path / "link" / "tiny") == 1
    assert run("convert", "--input-dir", raw, "--output-dir", raw / "sub" / ".." / ".." / "tiny") == 1
    assert tree(raw) == before


def test_output_that_is_the_working_directory_is_refused(tiny_raw, tmp_path, monkeypatch, capsys):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", ".", "--overwrite") == 1
    assert_untouched(work)
    assert "it is the working directory" in capsys.readouterr().err
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", "..", "--overwrite") == 1
    assert_untouched(work)
    assert "it contains the working directory" in capsys.readouterr().err


def test_quantize_into_its_own_model_is_refused(tiny_hf, tmp_path, capsys):
    model = shutil.copytree(tiny_hf, tmp_path / "model")
    before = tree(model)
    assert run("quantize", "--model-path", model, "--output-dir", model / "int8", "--overwrite") == 1
    assert tree(model) == before
    assert str(model) in capsys.readouterr().err


def test_apply_delta_onto_its_base_is_refused(tiny_hf, tiny_delta, tmp_path, capsys):
    base = tmp_path / "llama-tiny-hf"
    shutil.copytree(tiny_hf, base)
    before = tree(base)
    assert run("apply-delta", "--base", base, "--delta", tiny_delta, "--target", base) == 1
    assert tree(base) == before
    assert f"refusing to write the output {base}: it is the input {base}" in capsys.readouterr().err


def test_finetune_output_may_not_hold_its_checkpoints(tiny_hf, tmp_path):
    argv = ["finetune", "--model-path", tiny_hf, "--data", BUILTIN_CONVERSATIONS, "--output-dir", tmp_path / "out"]
    assert run(*argv, "--checkpoint-dir", tmp_path / "out" / "ckpt", "--max-steps", "1") == 1
    assert run(*argv, "--checkpoint-dir", tmp_path, "--max-steps", "1") == 1
    assert not (tmp_path / "out").exists()


def test_check_output_dir_refuses_roots_and_home(tmp_path):
    with pytest.raises(VicunaflowError, match="it is the filesystem root /"):
        outputs.check_output_dir("/", overwrite=True)
    with pytest.raises(VicunaflowError, match="it is the filesystem root"):
        outputs.check_output_dir(tmp_path / ".." / ".." / ".." / ".." / ".." / ".." / ".." / "..", overwrite=True)
    with pytest.raises(VicunaflowError, match="home directory"):
        outputs.check_output_dir(Path.home(), overwrite=True)
    assert outputs.check_output_dir(tmp_path / "new") == tmp_path / "new"


# ---- temporaries left by killed runs ------------------------------------------------------------------


def stalling_base(tiny_hf: Path, where: Path) -> Path:
    """A copy of tiny_hf whose tokenizer.json is a FIFO: `synth delta` writes its shards into its temporary,
    then blocks reading the FIFO, inside the output block, until something opens it for writing."""
    base = where / "stalling-base"
    shutil.copytree(tiny_hf, base)
    (base / "tokenizer.json").unlink()
    os.mkfifo(base / "tokenizer.json")
    return base


def start_stalled_writer(base: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """`vicunaflow synth delta` in a subprocess, stopped mid-write; returns it and its temporary."""
    before = set(temporaries(out.parent, out.name))
    argv = [sys.executable, "-m", "vicunaflow", "synth", "delta", "--base", str(base), "--output-dir", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = set(temporaries(out.parent, out.name)) - before
        if new and any(p.name.endswith(".bin") for p in next(iter(new)).iterdir()):
            return process, new.pop()
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.kill()
    raise AssertionError("synth delta never reached its output block")


def test_sigterm_removes_the_temporary(tiny_hf, tmp_path):
    base = stalling_base(tiny_hf, tmp_path)
    out = tmp_path / "delta"
    process, tmp = start_stalled_writer(base, out)
    assert tmp.is_dir()
    process.terminate()  # SIGTERM, as Snakemake and SLURM stop a job
    output = process.communicate(timeout=60)[0]
    assert temporaries(tmp_path, "delta") == [] and not out.exists()
    assert process.returncode == 143, output  # 128 + SIGTERM, after the cleanup


def test_rerun_removes_temporaries_of_killed_runs_only(tiny_hf, tmp_path):
    base = stalling_base(tiny_hf, tmp_path)
    out = tmp_path / "delta"
    killed, stale = start_stalled_writer(base, out)
    killed.kill()  # kill -9: nothing can clean up
    killed.wait()
    assert stale.is_dir()
    live, owned = start_stalled_writer(base, out)  # a run that is still writing the same output
    other = tmp_path / f".other.tmp-{killed.pid}.0@{socket.gethostname()}-abcdefgh"  # another output's
    elsewhere = tmp_path / f".delta.tmp-{killed.pid}.0@another-node-abcdefgh"  # a process on another host
    legacy = tmp_path / ".delta.tmp-abcdefgh"  # from a version that did not name the owner
    for path in (other, elsewhere, legacy):
        path.mkdir()
    try:
        assert run("synth", "delta", "--base", tiny_hf, "--output-dir", out) == 0
        assert not stale.exists()
        assert owned.is_dir() and other.is_dir() and elsewhere.is_dir() and legacy.is_dir()
        assert (out / "pytorch_model.bin.index.json").is_file()
    finally:
        live.terminate()
        live.communicate(timeout=60)
    assert not owned.exists()


def big_conversations(path: Path, n: int = 4000) -> Path:
    """Enough HTML replies that `data clean --jobs 1` writes its output for seconds."""
    reply = "<div><p>" + "word " * 200 + "</p><ul>" + "<li>item <b>x</b></li>" * 20 + "</ul></div>"
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": reply}]
            f.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")
    return path


def start_data_clean(source: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """`vicunaflow data clean` in a subprocess, caught while it writes; returns it and its temporary file."""
    argv = [sys.executable, "-m", "vicunaflow", "data", "clean", "--data", str(source), "--output", str(out)]
    process = subprocess.Popen([*argv, "--jobs", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = [p for p in temporaries(out.parent, out.name) if p.is_file() and p.stat().st_size > 0]
        if found:
            return process, found[0]
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.01)
    process.kill()
    raise AssertionError("data clean never wrote into its temporary")


def test_sigterm_removes_a_data_file_temporary(tmp_path):
    source = big_conversations(tmp_path / "in.jsonl")
    out = tmp_path / "clean.jsonl"
    process, tmp = start_data_clean(source, out)
    assert tmp.name.startswith(f".clean.jsonl.tmp-{process.pid}.{outputs._start_time(process.pid)}@{outputs._host()}-")
    process.terminate()  # SIGTERM, as Snakemake and SLURM stop a job
    output = process.communicate(timeout=60)[0]
    assert temporaries(tmp_path, "clean.jsonl") == [] and not out.exists()
    assert process.returncode == 143, output


def test_rerun_removes_data_file_temporaries_of_killed_runs_only(tmp_path):
    source = big_conversations(tmp_path / "in.jsonl", 1000)
    out = tmp_path / "clean.jsonl"
    killed, stale = start_data_clean(source, out)
    killed.kill()  # kill -9: nothing can clean up
    killed.wait()
    assert stale.is_file()
    live = tmp_path / f".clean.jsonl.tmp-{os.getpid()}.{outputs._start_time(os.getpid())}@{outputs._host()}-abcdefgh"
    elsewhere = tmp_path / f".clean.jsonl.tmp-{killed.pid}.0@another-node-abcdefgh"  # a process on another host
    other = tmp_path / f".other.jsonl.tmp-{killed.pid}.0@{outputs._host()}-abcdefgh"  # another output's
    for path in (live, elsewhere, other):
        path.write_text("partial")
    assert run("data", "clean", "--data", source, "--output", out, "--jobs", "1") == 0
    assert not stale.exists() and live.is_file() and elsewhere.is_file() and other.is_file()
    assert len(out.read_text().splitlines()) == 1000
    assert temporaries(tmp_path, "clean.jsonl") == sorted([elsewhere, live])


def test_single_file_writers_name_their_owner_and_clean_up(tmp_path):
    """eval, chat and download write their result files through atomic_write_bytes: the same temporaries."""
    target = tmp_path / "result.json"
    stale = tmp_path / f".result.json.tmp-999999999.1@{outputs._host()}-abcdefgh"  # its owner is gone
    stale.write_text("{")
    outputs.atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}" and not stale.exists() and temporaries(tmp_path, "result.json") == []
    with pytest.raises(outputs.Terminated), outputs.atomic_output_file(target) as tmp:
        assert tmp in outputs._ACTIVE, "registered: SIGTERM unwinds through it"
        tmp.write_bytes(b"partial")
        raise outputs.Terminated("as the SIGTERM handler raises it")
    assert target.read_bytes() == b"{}" and temporaries(tmp_path, "result.json") == [] and not outputs._ACTIVE


def test_a_reused_pid_does_not_keep_a_temporary_alive(tmp_path):
    target = tmp_path / "out"
    mine = outputs._start_time(os.getpid())
    reused = tmp_path / f".out.tmp-{os.getpid()}.{mine + 1}@{outputs._host()}-abcdefgh"  # same pid, started later
    current = tmp_path / f".out.tmp-{os.getpid()}.{mine}@{outputs._host()}-abcdefgh"
    reused.mkdir()
    current.mkdir()
    assert outputs.remove_stale_temporaries(target) == [reused]
    assert current.is_dir()


def test_a_temporary_of_another_pid_namespace_is_kept(tmp_path):
    """Containers sharing a hostname and a file system number their processes apart: a pid dead here may be
    a live writer there."""
    target = tmp_path / "out"
    hostname = outputs._host().split("~")[0]
    elsewhere = tmp_path / f".out.tmp-999999999.1@{hostname}~1-abcdefgh"  # same hostname, other PID namespace
    here = tmp_path / f".out.tmp-999999999.1@{outputs._host()}-abcdefgh"  # this namespace: the pid is gone
    elsewhere.mkdir()
    here.mkdir()
    assert f"@{hostname}~{os.stat('/proc/self/ns/pid').st_ino}-" in outputs._temp_prefix("out")
    assert outputs.remove_stale_temporaries(target) == [here]
    assert elsewhere.is_dir()


def test_sigterm_outside_an_output_keeps_its_usual_effect(tmp_path):
    """The parent of a torchrun launch writes nothing: SIGTERM still ends it at once, as before."""
    code = (
        "import os, signal\nfrom vicunaflow import outputs\n"
        "with outputs.terminate_on_sigterm():\n    os.kill(os.getpid(), signal.SIGTERM)\nprint('survived')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM and "survived" not in result.stdout


def test_manifest_written_by_vicunaflow_marks_a_complete_output(tiny_hf):
    manifest = json.loads((tiny_hf / outputs.MANIFEST).read_text())
    assert "vicunaflow" in manifest["versions"]
    assert outputs._why_kept(tiny_hf) is None  # replaceable


# ---- a single output file never replaces an input, another output, or a file inside an input --------------


@pytest.mark.parametrize(
    "case",
    ["clean report is the data", "split held-out is the output", "eval loss output is the data",
     "chat output is the prompts", "chat output inside the model", "eval answers output is the questions",
     "eval summary output is a loss file", "eval arena output is the votes"],
)  # fmt: skip
def test_an_output_file_that_is_an_input_is_refused_before_any_work(case, tiny_vicuna, tmp_path, capsys):
    """Each verb writing files refuses, before the model loads, an output path that is one of its inputs, lies
    inside an input folder (a model's config.json), or is another of its outputs; the input stays as it was."""
    data, model = tmp_path / "conversations.json", tmp_path / "model"
    shutil.copy(BUILTIN_CONVERSATIONS, data)
    shutil.copytree(tiny_vicuna, model)
    texts = {"prompts.txt": "Hello\n", "loss.json": "{}\n", "votes.jsonl": "",
             "questions.jsonl": '{"question_id": 1, "category": "writing", "turns": ["Hi"]}\n'}  # fmt: skip
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    prompts, losses, votes, questions = (tmp_path / name for name in texts)
    argv, kept, expected = {
        "clean report is the data": (["data", "clean", "--data", data, "--output", tmp_path / "o.jsonl",
                                      "--report", data], data, "is the input"),
        "split held-out is the output": (["data", "split", "--data", data, "--model-path", model, "--output",
                                          tmp_path / "t.jsonl", "--held-out", tmp_path / "t.jsonl",
                                          "--held-out-fraction", "0.5"], data, "are both"),
        "eval loss output is the data": (["eval", "loss", "--model-path", model, "--data", data, "--output", data],
                                         data, "is the input"),
        "chat output is the prompts": (["chat", "--model-path", model, "--prompts", prompts, "--output", prompts],
                                       prompts, "is the input"),
        "chat output inside the model": (["chat", "--model-path", model, "--prompts", prompts, "--output",
                                          model / "config.json"], model / "config.json", "lies inside the input"),
        "eval answers output is the questions": (["eval", "answers", "--model-path", model, "--questions", questions,
                                                  "--output", questions], questions, "is the input"),
        "eval summary output is a loss file": (["eval", "summary", "--questions", questions, "--losses", losses,
                                                "--output", losses], losses, "is the input"),
        "eval arena output is the votes": (["eval", "arena", "--votes", votes, "--output", votes], votes,
                                           "is the input"),
    }[case]  # fmt: skip
    before = kept.read_bytes()
    assert run(*argv) == 1
    assert expected in capsys.readouterr().err
    assert kept.read_bytes() == before


def test_an_unwritable_output_folder_is_refused_before_any_work(tiny_raw, tmp_path, capsys, monkeypatch):
    """A folder the process cannot create files in is named at once (tried for real, as root too), not after
    the work as a PermissionError from deep inside."""
    real = outputs.tempfile.NamedTemporaryFile

    def refused(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", refused)
    assert run("convert", "--input-dir", tiny_raw, "--output-dir", tmp_path / "locked" / "out") == 1
    assert f"cannot write in {tmp_path / 'locked'} (Permission denied)" in capsys.readouterr().err


# ---- an existing output file is replaced only when it is this verb's unchanged earlier output --------------


def test_data_clean_replaces_its_own_unchanged_output_only(tmp_path, capsys):
    """The default report (a side file the user never typed) is as safe as --output: a file vicunaflow did not
    write, one it wrote but that was edited since, or another verb's, is refused before any work."""
    data = tmp_path / "in.jsonl"
    data.write_text(CONVERSATION)
    out, report = tmp_path / "out.jsonl", tmp_path / "out.counts.tsv"
    argv = ["data", "clean", "--data", data, "--output", out, "--jobs", "1"]
    report.write_text("my notes\n")
    assert run(*argv) == 1
    assert (
        f"--report {report} exists and was not written by vicunaflow (no .out.counts.tsv.vicunaflow.json beside it); "
        "refusing to replace it: move it away, give --report another path, or pass --overwrite to replace it"
    ) in capsys.readouterr().err
    assert report.read_text() == "my notes\n" and not out.exists(), "refused before any work"
    assert run(*argv, "--overwrite") == 0
    assert report.read_text().startswith("step\t") and out.is_file()
    assert run(*argv) == 0, "its own unchanged earlier output is replaced without --overwrite"
    with out.open("a") as f:
        f.write('{"id": "mine", "conversations": []}\n')
    assert run(*argv) == 1
    assert f"--output {out} exists and was changed since vicunaflow wrote it" in capsys.readouterr().err
    assert out.read_text().endswith('"mine", "conversations": []}\n')
    assert run("data", "mix", "--data", data, "--weights", "[1]", "--output", report) == 1
    assert (
        f"--output {report} exists and holds the output of `vicunaflow data clean`, not of `vicunaflow data mix`"
        in (capsys.readouterr().err)
    )


def test_a_file_put_at_the_output_during_the_run_is_kept(tmp_path, monkeypatch):
    """The up-front check saw the path before the work; right before the rename the same rule is applied again, with
    the flag and --overwrite that check was given: a file the user put there meanwhile is kept and the result
    discarded, unless --overwrite was given; the verb's own unchanged earlier output is still replaced."""
    monkeypatch.setattr(outputs, "VERB", "data clean")
    monkeypatch.setattr(outputs, "CHECKED_FILES", {})
    monkeypatch.setattr(outputs, "WRITTEN_FILES", set())
    target = tmp_path / "out.jsonl"
    outputs.check_output_files({"--output": target})
    with pytest.raises(VicunaflowError) as refused, outputs.atomic_output_file(target) as tmp:
        tmp.write_text("result\n")
        target.write_text("mine\n")  # the user, while the verb works
    assert str(refused.value) == (
        f"--output {target} exists and was not written by vicunaflow (no .out.jsonl.vicunaflow.json beside it); "
        "it appeared or changed there while this run worked, so its result is discarded; refusing to replace it: "
        "move it away, give --output another path, or pass --overwrite to replace it"
    )
    assert target.read_text() == "mine\n" and temporaries(tmp_path, "out.jsonl") == []
    assert not outputs.provenance_sidecar(target).exists()

    outputs.check_output_files({"--output": target}, overwrite=True)
    with outputs.atomic_output_file(target) as tmp:
        tmp.write_text("result\n")
    assert target.read_text() == "result\n", "--overwrite replaces it"
    outputs.check_output_files({"--output": target})
    with outputs.atomic_output_file(target) as tmp:
        tmp.write_text("again\n")
    assert target.read_text() == "again\n", "its own unchanged earlier output is replaced"

    outputs.check_output_files({"--output": target})
    edited = pytest.raises(VicunaflowError, match="was changed since vicunaflow wrote it")
    with edited, outputs.atomic_output_file(target) as tmp:
        tmp.write_text("third\n")
        with target.open("a") as f:
            f.write("my note\n")  # the user edits the earlier output meanwhile
    assert target.read_text() == "again\nmy note\n" and temporaries(tmp_path, "out.jsonl") == []

    outputs.CHECKED_FILES.clear()  # a new command (the CLI clears these as one ends)
    unchecked = tmp_path / "library.json"  # written without an up-front check: nothing said --overwrite
    not_ours = pytest.raises(VicunaflowError, match=f"the output {unchecked} exists and was not written by vicunaflow")
    with not_ours, outputs.atomic_output_file(unchecked) as tmp:
        tmp.write_text("{}")
        unchecked.write_text("mine")
    assert unchecked.read_text() == "mine" and temporaries(tmp_path, "library.json") == []


def test_a_file_put_at_a_later_output_during_the_run_refuses_the_first_rename_too(tiny_hf, tmp_path, capsys):
    """data split writes its held-out file, then its output: a file the user puts at the output while it works
    is found before the held-out file lands, so neither is replaced and neither new file appears."""
    from vicunaflow.dataprep import split as split_module

    data, out = tmp_path / "in.jsonl", tmp_path / "train.jsonl"
    held_out = tmp_path / "train.heldout.jsonl"
    data.write_text("".join(CONVERSATION.replace('"a"', f'"c{i}"') for i in range(40)))
    real_writer = split_module.atomic_writer

    @contextlib.contextmanager
    def writer_and_a_user(path, *args, **kwargs):
        with real_writer(path, *args, **kwargs) as handle:
            yield handle
            if Path(path) == held_out:  # the held-out file is renamed first, the output after it
                out.write_text("mine\n")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split_module, "atomic_writer", writer_and_a_user)
        argv = ["data", "split", "--data", data, "--model-path", tiny_hf, "--output", out, "--held-out-fraction", "0.5"]
        assert run(*argv) == 1
    assert f"--output {out} exists and was not written by vicunaflow" in capsys.readouterr().err
    assert out.read_text() == "mine\n" and not held_out.exists()
    assert not outputs.CHECKED_FILES and not outputs.WRITTEN_FILES, "cleared when the command ends"


@pytest.mark.parametrize(
    "case",
    ["split default held-out", "split default report", "mix report", "eval loss output", "eval arena json",
     "eval summary output", "eval answers output", "chat output", "report finetune options table"],
)  # fmt: skip
def test_every_verb_writing_files_refuses_a_user_file_before_any_work(case, tiny_vicuna, tmp_path, capsys):
    data, mine = tmp_path / "in.jsonl", tmp_path / "mine.txt"
    data.write_text(CONVERSATION)
    questions, votes, prompts = tmp_path / "questions.jsonl", tmp_path / "votes.jsonl", tmp_path / "prompts.txt"
    questions.write_text('{"question_id": 1, "category": "writing", "turns": ["Hi"]}\n')
    votes.write_text("")
    prompts.write_text("Hello\n")
    losses = tmp_path / "loss.json"
    losses.write_text("{}\n")
    split = ["data", "split", "--data", data, "--model-path", tiny_vicuna, "--output", tmp_path / "mine.jsonl"]
    argv, kept = {
        "split default held-out": ([*split, "--held-out-fraction", "0.5"], tmp_path / "mine.heldout.jsonl"),
        "split default report": (split, tmp_path / "mine.counts.tsv"),
        "mix report": (["data", "mix", "--data", data, "--weights", "[1]", "--output", tmp_path / "o.jsonl",
                        "--report", mine], mine),
        "eval loss output": (["eval", "loss", "--model-path", tiny_vicuna, "--data", data, "--output", mine], mine),
        "eval arena json": (["eval", "arena", "--votes", votes, "--output", tmp_path / "r.tsv", "--output-json",
                             mine], mine),
        "eval summary output": (["eval", "summary", "--questions", questions, "--losses", losses, "--output", mine],
                                mine),
        "eval answers output": (["eval", "answers", "--model-path", tiny_vicuna, "--questions", questions,
                                 "--output", mine], mine),
        "chat output": (["chat", "--model-path", tiny_vicuna, "--prompts", prompts, "--output", mine], mine),
        "report finetune options table": (["report", "finetune", "--run-dir", tiny_vicuna, "--loss-plot",
                                           tmp_path / "loss.svg", "--options-table", mine], mine),
    }[case]  # fmt: skip
    kept.write_text("mine\n")
    assert run(*argv) == 1
    assert f"{kept} exists and was not written by vicunaflow" in capsys.readouterr().err
    assert kept.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"in.jsonl", "questions.jsonl", "votes.jsonl", "prompts.txt", "loss.json", kept.name}
    ), "nothing written"


def test_a_provenance_sidecar_is_written_after_its_file(tmp_path):
    """Written once the file is in place, so it records the file's final size and time; an unreadable or foreign
    sidecar counts as none (the file is kept)."""
    target = tmp_path / "result.json"
    outputs.atomic_write_bytes(target, b"{}\n")
    sidecar = outputs.provenance_sidecar(target)
    assert sidecar == tmp_path / ".result.json.vicunaflow.json"
    record = json.loads(sidecar.read_text())
    assert (record["size"], record["mtime_ns"]) == (3, target.stat().st_mtime_ns)
    assert outputs._why_file_kept(target) is None
    sidecar.write_text("{")
    assert "was not written by vicunaflow" in outputs._why_file_kept(target)
    sidecar.write_text('{"size": 3}')
    assert "is not vicunaflow's" in outputs._why_file_kept(target)
