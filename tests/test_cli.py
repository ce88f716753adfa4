"""The verb table, `--help` and the workflow's defaults agree."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vicunaflow import cli

REPO = Path(__file__).resolve().parents[1]


def leaf_specs(table=cli.COMMANDS, prefix=()):
    for verb, spec in table.items():
        if isinstance(spec, dict):
            yield from leaf_specs(spec, (*prefix, verb))
        else:
            yield (*prefix, verb), spec


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vicunaflow", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_verb() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for verb in cli.COMMANDS:
        assert verb in result.stdout


@pytest.mark.parametrize(
    ("verbs", "spec"), list(leaf_specs()), ids=lambda v: " ".join(v) if isinstance(v, tuple) else v
)
def test_every_verb_has_documented_keyword_only_arguments(verbs: tuple[str, ...], spec: str) -> None:
    function = cli.resolve(spec)
    parameters = inspect.signature(function).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), spec
    doc = inspect.getdoc(function) or ""
    assert "Arguments:" in doc, f"{spec} needs an Arguments: docstring (it becomes --help)"
    documented = doc.split("Arguments:", 1)[1]
    for p in parameters:
        assert f"{p.name}:" in documented, f"{spec}: argument {p.name} is not documented"
    # As the CLI shows it: a dataclass parameter spread into its fields, each documented by the dataclass.
    spread = cli.spread(function)
    documented = inspect.getdoc(spread).split("Arguments:", 1)[1]
    for p in inspect.signature(spread).parameters.values():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and f"\n    {p.name}:" in documented, (spec, p.name)


def test_dashed_and_fastchat_flags_are_accepted() -> None:
    argv = ["apply-delta", "--base-model-path", "a", "--delta-path=b", "--low-cpu-mem", "--max-shard-size", "1GB"]
    assert cli._normalize_flags(argv) == [
        "apply-delta",
        "--base",
        "a",
        "--delta=b",
        "--max_shard_size",
        "1GB",
    ]


def test_fastchat_train_flags_are_accepted_by_finetune() -> None:
    """FastChat's README command for train_mem.py stopped at "unrecognized arguments: --model_name_or_path ..."."""
    argv = [
        "finetune",
        "--model_name_or_path",
        "m",
        "--data_path=d",
        "--output_dir",
        "o",
        "--evaluation_strategy",
        "no",
    ]
    argv += ["--per_device_eval_batch_size", "2", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    assert cli._normalize_flags(argv) == ["finetune", "--model_path", "m", "--data=d", "--output_dir", "o"]
    asked = ["finetune", "--evaluation_strategy", "steps", "--fsdp_transformer_layer_cls_to_wrap=MistralDecoderLayer"]
    assert cli._normalize_flags(asked) == asked  # what finetune does not do stays an error


@pytest.mark.parametrize(
    "args",
    [
        ("finetune", "--model-path", "m", "--data", "d", "--output-dir", "o", "--learning_rat", "1e-4"),
        ("finetune", "--model-path", "m", "--data", "d", "--output-dir", "o", "--learning-rat=1e-4"),
        ("data", "preview", "--data", "d", "--model-path", "m", "--form", "json"),
    ],
    ids=["finetune", "finetune-dashed", "data-preview"],
)
def test_a_flag_prefix_is_refused_not_taken_for_the_option(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode != 0
    assert "unrecognized arguments: --" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_path_given_to_a_list_of_paths_is_a_path_not_a_file_of_options(tmp_path, capsys) -> None:
    """jsonargparse read each lone value of a list[Path] flag whole as a YAML file of options (a 1 GB data set
    parsed before the verb ran), and a file that is no UTF-8 text failed in the parser, naming no file."""
    import gzip

    argv = ["data", "mix", "--data", "a.jsonl", "b.jsonl", "--weights", "1", "1", "--data", "c.jsonl"]
    assert cli._repeated_list_flags(argv) == [
        "data", "mix", "--data+", '["a.jsonl"]', "--data+", '["b.jsonl"]', "--weights+", "1", "--weights+", "1",
        "--data+", '["c.jsonl"]',
    ]  # fmt: skip
    packed = tmp_path / "sg.json"
    packed.write_bytes(gzip.compress(b"[]"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["data", "mix", "--data", str(packed), "--weights", "1", "--output", str(tmp_path / "m.jsonl")])
    assert exit.value.code == 1
    assert f"{packed}: gzip-compressed, not JSON text" in capsys.readouterr().err


def test_workflow_defaults_match_cli_defaults() -> None:
    """convert.* defaults in the schema are the defaults of `vicunaflow convert`."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    convert_defaults = {k: v["default"] for k, v in schema["properties"]["convert"]["properties"].items()}
    signature = inspect.signature(cli.resolve(cli.COMMANDS["convert"])).parameters
    for name, default in convert_defaults.items():
        assert signature[name].default == default, name


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    """`vicunaflow --version` prints the version pyproject.toml gives (and the installed metadata)."""
    import importlib.metadata
    import re

    result = run_cli(flag)
    assert result.returncode == 0, result.stderr
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert result.stdout == f"vicunaflow {version}\n"
    assert importlib.metadata.version("vicunaflow") == version


def test_model_loading_help_is_model_options_in_chat_serve_and_eval_answers() -> None:
    """The five loading flags' help comes from one place (ModelOptions' docstring) and says what the code
    does: tensor parallelism (not device_map layers), vicunaflow.quant int8/int4 (not bitsandbytes)."""
    import re

    from vicunaflow.loading import ModelOptions

    documented = inspect.getdoc(ModelOptions).split("Arguments:", 1)[1]
    fields = dict(re.findall(r"^\s{4}(\w+): (.+)$", documented, re.MULTILINE))
    assert set(fields) == {"device", "num_gpus", "max_gpu_memory", "load_8bit", "load_4bit"}
    assert (
        "tensor parallelism" in fields["num_gpus"] and "int8" in fields["load_8bit"] and "int4" in fields["load_4bit"]
    )
    for verb in (["chat"], ["serve"], ["eval", "answers"]):
        result = run_cli(*verb, "--help")
        assert result.returncode == 0, result.stderr
        shown = " ".join(result.stdout.split())
        for name, text in fields.items():
            assert f"--{name} " in shown and " ".join(text.split()) in shown, (verb, name)
        assert "device_map" not in shown and "bitsandbytes" not in shown, verb


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["eval", "summary", "--questions", "q.jsonl", "--output", "s.tsv", "--judgments", "-"], "--judgments"),
        (
            ["eval", "summary", "--questions", "q.jsonl", "--output", "s.tsv", "--judgments", "j.jsonl", "-"],
            "--judgments",
        ),
        (["eval", "summary", "--questions", "q.jsonl", "--output", "s.tsv", "--arena=-"], "--arena"),
        (["eval", "summary", "--questions", "-", "--output", "s.tsv", "--losses", "l.json"], "--questions"),
        (["eval", "summary", "--questions", "q.jsonl", "--output-json", "-", "--losses", "l.json"], "--output-json"),
        (["eval", "judge", "--questions", "q.jsonl", "--answers", "-", "--output", "j.jsonl"], "--answers"),
        (["eval", "arena", "--votes", "-", "--output", "r.tsv"], "--votes"),
        (["data", "split", "--data", "-", "--model-path", "m", "--output", "s.jsonl"], "--data"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_a_dash_for_a_path_is_refused_naming_the_flag(args, flag, tmp_path, monkeypatch, capsys) -> None:
    """`--judgments -` went on as a file named "-" ("-: no such judgment file"; `--output-json -` wrote ./-): no
    verb reads stdin or writes stdout through a path, so `-` is refused in one line naming the flag and the fix."""
    monkeypatch.chdir(tmp_path)
    error = one_error_line(args, capsys)
    assert f"{flag} -: vicunaflow reads and writes files by path, not stdin or stdout; give a path" in error
    assert f"then {flag} FILE" in error
    assert not (tmp_path / "-").exists()


def one_error_line(args: list[str], capsys) -> str:
    """cli.main(args) ends with status 1 and one ERROR line on stderr: that line."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert stopped.value.code == 1 and len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["quantize", "--model-path", "", "--output-dir", "q"], "--model-path"),
        (["quantize", "--model-path", "m", "--output-dir="], "--output-dir"),
        (["finetune", "--model-path", "m", "--data", "", "--output-dir", "o"], "--data"),
        (["finetune", "--model-path", "m", "--data", "d", "--output-dir", " "], "--output-dir"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_an_empty_path_is_refused_naming_the_flag(args, flag, tmp_path, monkeypatch, capsys) -> None:
    """`--model-path "$UNSET"` went on as "." (quantize: "the output q lies inside the input ."; finetune:
    ".: not a tokenised dataset", "it lies inside the --output-dir ;")."""
    monkeypatch.chdir(tmp_path)
    assert f"{flag} is empty; give a path" in one_error_line(args, capsys)


def test_an_error_of_the_system_is_one_line_naming_the_path(tmp_path, capsys):
    """An OSError (here: a folder given where a file is read) ends the command with status 1 and one line naming
    the path, not a traceback."""
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "arena", "--votes", str(tmp_path), "--output", str(tmp_path / "ratings.tsv")])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and str(tmp_path) in err and "Traceback" not in err


def dry_run(tmp_path: Path, config: dict, *targets: str) -> subprocess.CompletedProcess:
    """`snakemake -n -p TARGETS` in a fresh working directory with `config` on top of config/config.yaml."""
    (tmp_path / "config").symlink_to(REPO / "config")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1"]
    return subprocess.run(
        [*command, "-n", "-p", *targets, "--configfile", str(tmp_path / "my.yaml")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_a_max_shard_size_with_a_space_reaches_each_verb_as_one_argument(tmp_path: Path) -> None:
    """The schema takes `5 GB` (and parse_size does): the rules must not split it into `5` and a stray `GB`."""
    result = dry_run(tmp_path, {"convert": {"max_shard_size": "5 GB"}}, "vicuna-13b-all-v1.1-int4")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "--max-shard-size" in line]
    assert len(commands) == 3  # convert, apply-delta, quantize
    assert all("--max-shard-size '5 GB'" in line for line in commands), commands


@pytest.mark.parametrize(
    ("defaults", "key"),
    [({"resources": {"gpu": 2}}, "resources"), ({"data": "mine.json"}, "data"), ({"model": "llama-7b-hf"}, "model")],
)
def test_a_runs_own_key_in_finetune_defaults_fails_the_plan_naming_it(tmp_path: Path, defaults: dict, key: str) -> None:
    """finetune.defaults holds options of `vicunaflow finetune`: a run's model, data or resources there were
    silently ignored (or written into every run's --config file), not refused."""
    config = {"finetune": {"defaults": defaults, "runs": {"r": {"model": "vicuna-tiny-all-v1.1"}}}}
    result = dry_run(tmp_path, config, "fine_tuning_output/r")
    assert result.returncode != 0
    assert f"finetune.defaults.{key}" in result.stdout + result.stderr


@pytest.mark.parametrize("source", ["pyllama", "meta"])
def test_download_urls_with_shell_characters_reach_each_verb_as_one_argument(tmp_path: Path, source: str) -> None:
    """A mirror URL with a query string (`&` would background the command) or a space stays one argument."""
    url = "https://mirror.example/llama files?a=1&b=2"
    config = {
        "llama": {"source": source, "pyllama": {"base_url": url}, "meta": {"url_env": "MY URL&ENV"}},
        "eval": {"mt_bench": {"base_url": url}},
    }
    result = dry_run(tmp_path, config, "resources/mt_bench", "pyllama_data/7B", "pyllama_data/tokenizer.model")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("Shell command: vicunaflow ")]
    quoted = "'https://mirror.example/llama files?a=1&b=2'"
    assert [line for line in lines if "eval download" in line and f"--base-url {quoted} " in line], lines
    llama = [line for line in lines if "download llama" in line]
    assert len(llama) == 2, lines  # the tokenizer and 7B
    expected = f"--base-url {quoted} " if source == "pyllama" else "--url-env 'MY URL&ENV' "
    assert all(expected in line for line in llama), llama
