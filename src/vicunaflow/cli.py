"""The `vicunaflow` command: one table of verbs -> typed functions, nothing else.

Arguments, defaults and help come from each function's signature and `Arguments:` docstring
(jsonargparse), so the CLI cannot drift from the code. A parameter typed as a dataclass (finetune's
TrainConfig; the ModelOptions of chat, serve and eval answers) is spread into one flag per field, with
the dataclass's own defaults and `Arguments:` docs, and `--config FILE` takes those fields as flat
keys. Only the module of the verb being run is imported, which keeps `vicunaflow <verb>` quick to start
inside Snakemake jobs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import sys
import typing
from collections.abc import Callable

# verb -> "module:function", or a nested table for verbs with sub-verbs.
COMMANDS: dict[str, str | dict[str, str]] = {
    "download": {"llama": "vicunaflow.download:download_llama", "hf": "vicunaflow.download:download_hf"},
    "synth": {"llama": "vicunaflow.synth:synth_llama", "delta": "vicunaflow.synth:synth_delta"},
    "convert": "vicunaflow.convert:convert",
    "apply-delta": "vicunaflow.delta:apply_delta",
    "make-delta": "vicunaflow.delta:make_delta",
    "quantize": "vicunaflow.quantize:quantize_model",
    "data": {
        "tokenize": "vicunaflow.data:tokenize",
        "preview": "vicunaflow.data:preview",
        "fetch": "vicunaflow.dataprep.sources:fetch",
        "clean": "vicunaflow.dataprep.clean:clean",
        "mix": "vicunaflow.dataprep.sources:mix",
        "split": "vicunaflow.dataprep.split:split",
    },
    "finetune": "vicunaflow.finetune:setup",
    "chat": "vicunaflow.chat:chat",
    "serve": "vicunaflow.serve:serve",
    "report": {"finetune": "vicunaflow.report:finetune_report"},
    "eval": {
        "download": "vicunaflow.eval.mt_bench:download_mt_bench",
        "answers": "vicunaflow.eval.answers:answers",
        "judge": "vicunaflow.eval.judge:judge",
        "loss": "vicunaflow.eval.loss:loss",
        "summary": "vicunaflow.eval.summary:summary",
        "arena": "vicunaflow.eval.arena:arena",
        "harness": "vicunaflow.eval.harness:harness",
    },
}

# FastChat's flag names, accepted so its users' commands keep working.
ALIASES: dict[str, dict[str, str]] = {
    "apply-delta": {"--base-model-path": "--base", "--delta-path": "--delta", "--target-model-path": "--target"},
    "make-delta": {"--base-model-path": "--base", "--target-model-path": "--target", "--delta-path": "--delta"},
    "finetune": {"--model_name_or_path": "--model_path", "--data_path": "--data"},  # FastChat's train.py
}
# FastChat flags that ask for what we always do (apply-delta streams tensor by tensor): accepted, ignored.
ALWAYS_ON = {"apply-delta": {"--low-cpu-mem"}}
# FastChat train.py flags whose value asks for what finetune always does (each decoder layer its own FSDP unit, no
# evaluation during training): accepted with that value (None: any) and ignored; another value stays an error.
ALWAYS_ON_VALUES: dict[str, dict[str, str | None]] = {
    "finetune": {
        "--fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "--evaluation_strategy": "no",
        "--per_device_eval_batch_size": None,
    }
}


def resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _table(commands: dict) -> dict:
    return {verb: _table(spec) if isinstance(spec, dict) else spread(resolve(spec)) for verb, spec in commands.items()}


def spread(function: Callable) -> Callable:
    """`function` as the CLI shows it: each parameter typed as a dataclass becomes that dataclass's fields.

    `setup(*, config: TrainConfig, nproc_per_node=None)` is offered as `--model_path ... --learning_rate ...
    --nproc_per_node ...`, documented by the dataclass's `Arguments:`; the call builds the dataclass back.
    A function without such a parameter is returned as it is.
    """
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # leave the signature to jsonargparse, which reports problems itself
        return function
    groups = {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}
    if not groups:
        return function
    parameters, docs = [], {}
    for parameter in inspect.signature(function).parameters.values():
        cls = groups.get(parameter.name)
        if cls is None:
            parameters.append(parameter.replace(annotation=hints[parameter.name]))
            continue
        field_hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            default = inspect.Parameter.empty if default is dataclasses.MISSING else default  # required
            parameters.append(
                inspect.Parameter(
                    field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=field_hints[field.name]
                )
            )
        docs[parameter.name] = _arguments_doc(inspect.getdoc(cls) or "")

    def spread_call(**kwargs):
        for name, cls in groups.items():
            fields = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs}
            kwargs[name] = cls(**fields)
        return function(**kwargs)

    spread_call.__name__, spread_call.__qualname__ = function.__name__, function.__qualname__
    spread_call.__module__ = function.__module__
    spread_call.__signature__ = inspect.Signature(
        parameters, return_annotation=hints.get("return", inspect.Signature.empty)
    )
    spread_call.__annotations__ = {p.name: p.annotation for p in parameters}
    # The function's docstring, its `name: ...` entry for each dataclass replaced by the dataclass's entries.
    lines, result, skipping = (inspect.getdoc(function) or "").splitlines(), [], False
    for line in lines:
        entry = line.strip().split(":", 1)[0]
        if skipping and (not line.strip() or len(line) - len(line.lstrip()) > 4):
            continue
        skipping = line.startswith("    ") and not line.startswith("     ") and entry in docs
        result.extend(docs[entry] if skipping else [line])
    spread_call.__doc__ = "\n".join(result)
    return spread_call


def _arguments_doc(doc: str) -> list[str]:
    """The entry lines of a docstring's `Arguments:` section."""
    return [line for line in doc.split("Arguments:", 1)[1].splitlines() if line.strip()] if "Arguments:" in doc else []


def _hints(argv: list[str]) -> dict[str, object]:
    """Parameter name -> type of the verb in argv as the CLI shows it (see spread); {} when unknown."""
    spec = COMMANDS.get(argv[0]) if argv else None
    if isinstance(spec, dict):
        spec = spec.get(argv[1]) if len(argv) > 1 else None
    if not isinstance(spec, str):
        return {}
    try:
        return typing.get_type_hints(spread(resolve(spec)))
    except Exception:  # leave the arguments to jsonargparse, which reports problems itself
        return {}


def _normalize_flags(argv: list[str]) -> list[str]:
    """Accept FastChat's flag names and `--dashed-names` for the signature's `--underscored_names`."""
    aliases = ALIASES.get(argv[0], {}) if argv else {}
    always_on = ALWAYS_ON.get(argv[0], set()) if argv else set()
    with_values = ALWAYS_ON_VALUES.get(argv[0], {}) if argv else {}
    normalized, skip = [], False
    for i, arg in enumerate(argv):
        if skip or arg in always_on:
            skip = False
            continue
        flag, eq, value = arg.partition("=")
        if flag in with_values:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if with_values[flag] in (None, value):
                skip = not eq  # and its value
                continue
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            flag = aliases.get(flag, flag)
            arg = "--" + flag[2:].replace("-", "_") + eq + value
        normalized.append(arg)
    return normalized


def _bare_bool_flags(argv: list[str]) -> list[str]:
    """`--load_8bit` alone means `--load_8bit=true` for a bool parameter (FastChat's flag style)."""
    bools = {f"--{name}" for name, hint in _hints(argv).items() if hint is bool}
    return [
        f"{arg}=true" if arg in bools and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else arg
        for i, arg in enumerate(argv)
    ]


def _repeated_list_flags(argv: list[str]) -> list[str]:
    """`--model_path A --model_path B` means both for a list parameter (jsonargparse alone keeps the last),
    and so does `--tasks a b` (values up to the next flag): every value after the first becomes jsonargparse's
    append form, `--model_path+ B`. A parameter that only takes lists (`list[str]`, `list[Path] | None`)
    takes a lone value as a one-item list too; a JSON list (`--tasks '[a, b]'`) is passed as it is."""
    import types

    def is_list(hint) -> bool:
        return typing.get_origin(hint) is list or any(typing.get_origin(h) is list for h in typing.get_args(hint))

    def list_only(hint) -> bool:
        if typing.get_origin(hint) not in (typing.Union, types.UnionType):
            return typing.get_origin(hint) is list
        return all(typing.get_origin(h) is list for h in typing.get_args(hint) if h is not type(None))

    hints = {f"--{name}": hint for name, hint in _hints(argv).items() if is_list(hint)}
    expanded, flag = [], None  # `--tasks a b` -> `--tasks a --tasks b`
    for arg in argv:
        if arg.startswith("--"):
            flag = arg if arg in hints else None
            expanded.append(arg)
        elif flag is not None and expanded[-1] != flag:
            expanded += [flag, arg]
        else:
            expanded.append(arg)
    seen, result = set(), []
    for i, arg in enumerate(expanded):
        flag, eq, value = arg.partition("=")
        if flag in hints:
            value = value if eq else (expanded[i + 1] if i + 1 < len(expanded) else "")
            if flag in seen or (list_only(hints[flag]) and not value.lstrip().startswith("[")):
                arg = flag + "+" + eq + value if eq else flag + "+"
            seen.add(flag)
        result.append(arg)
    return _paths_as_json(result, {flag for flag, hint in hints.items() if list_only(hint) and _of_paths(hint)})


def _of_paths(hint) -> bool:
    """Whether `hint` is a list of paths (`list[Path]`, `list[Path] | None`)."""
    from pathlib import Path

    return any(typing.get_origin(h) is list and typing.get_args(h) == (Path,) for h in (hint, *typing.get_args(hint)))


def _paths_as_json(argv: list[str], flags: set[str]) -> list[str]:
    """`--data+ a.jsonl` as `--data+ '["a.jsonl"]'`: jsonargparse reads a lone value of a list of paths that names a
    file as a YAML file of options first (a whole 1 GB data set, before the verb runs; a gzip file fails there,
    naming no file); a JSON list is taken as it is. `-` is left alone, for _refuse_dash_paths to name."""

    def as_json(value: str) -> str:
        return value if value == "-" or value.lstrip().startswith("[") else json.dumps([value])

    result = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag.removesuffix("+") in flags:
            arg = flag + eq + as_json(value)
        elif i and argv[i - 1].removesuffix("+") in flags and not arg.startswith("--"):
            arg = as_json(arg)
        result.append(arg)
    return result


def _takes_paths(hint) -> bool:
    """Whether `hint` is a path or a list of paths (`Path`, `Path | None`, `list[Path]`, `list[Path] | None`)."""
    from pathlib import Path

    return any(h is Path or _of_paths(h) for h in (hint, *typing.get_args(hint)))


def _refuse_dash_paths(argv: list[str]) -> None:
    """Refuse `-` given to a path flag (`eval summary --judgments -`), naming the flag and what to give instead; and
    an empty one (`--model-path "$UNSET"`), which went on as "." (quantize: "the output lies inside the input .").

    No verb reads stdin or writes stdout through a path: inputs are checked and recorded as files (manifests, the
    `--overwrite` checks), and `-` went on as a file named "-" ("-: no such judgment file", or an output written to
    ./-). Only `chat` reads stdin, piped, without a flag. Runs on argv as _repeated_list_flags leaves it.
    """
    from vicunaflow import VicunaflowError

    flags = {f"--{name}" for name, hint in _hints(argv).items() if _takes_paths(hint)}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        flag = flag.removesuffix("+")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        shown = flag.replace("_", "-")
        if flag in flags and value == "" and (eq or i + 1 < len(argv)):  # Path("") is ".", the working directory
            raise VicunaflowError(f"{shown} is empty; give a path (was a shell variable unset?)")
        if flag in flags and value == "-":
            raise VicunaflowError(
                f"{shown} -: vicunaflow reads and writes files by path, not stdin or stdout; give a path "
                f"(for piped input, save it first: `... > FILE`, then {shown} FILE)"
            )


def _exact_flags_parser() -> type:
    """jsonargparse's parser without argparse's prefix matching: `--learning_rat` is an error, not the learning rate.

    A class, not `allow_abbrev=False`: jsonargparse builds each verb's parser as `type(parser)()`.
    """
    from jsonargparse import ArgumentParser

    class ExactFlagsParser(ArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    return ExactFlagsParser


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    from vicunaflow import VicunaflowError, outputs
    from vicunaflow.log import setup_logging
    from vicunaflow.outputs import Terminated, terminate_on_sigterm

    argv = _repeated_list_flags(_bare_bool_flags(_normalize_flags(list(sys.argv[1:] if argv is None else argv))))
    if argv[:1] in (["--version"], ["-V"]):
        from vicunaflow import __version__

        sys.stdout.write(f"vicunaflow {__version__}\n")
        return
    # Build the parser for the chosen verb alone; `--help` (or no verb) shows the whole table.
    commands = {argv[0]: COMMANDS[argv[0]]} if argv and argv[0] in COMMANDS else COMMANDS
    setup_logging()
    verb = argv[:2] if isinstance(commands.get(argv[0] if argv else None), dict) else argv[:1]
    known = bool(argv) and argv[0] in COMMANDS and not verb[-1].startswith("-")
    outputs.VERB = " ".join(verb) if known else None  # what manifests record
    try:
        _refuse_dash_paths(argv)
        with terminate_on_sigterm():  # Snakemake and SLURM stop jobs with SIGTERM: clean up as for Ctrl-C
            CLI(_table(commands), args=argv, as_positional=False, parser_class=_exact_flags_parser())
    except KeyboardInterrupt:
        sys.exit(130)
    except Terminated:
        sys.exit(143)  # 128 + SIGTERM, what a shell reports for a process it killed
    except VicunaflowError as err:
        logging.getLogger("vicunaflow").error("%s", err)
        sys.exit(1)
    except OSError as err:  # the system said no (a permission, a full disk, a path): one line naming it
        logging.getLogger("vicunaflow").error("%s", err)
        logging.getLogger("vicunaflow").debug("where", exc_info=True)
        sys.exit(1)
    finally:
        outputs.VERB = None
        outputs.CHECKED_FILES.clear()
        outputs.WRITTEN_FILES.clear()
