"""What int8 and int4 weights cost in quality (issue 14): perplexity of a model trained for it, and 7B-shape logits.

Why two parts: a random model says nothing about perplexity (it has none worth keeping), and a model
small enough to train on a CPU says little about 7B's shapes; each part covers what the other cannot.

--train (CPU, ~15 minutes on 2 cores): builds Vicuna v1.1 conversations from this Python's standard
library, offline and deterministic: "What does `json.dumps` do?" answered by its signature and
docstring, the modules' docstrings, and the language reference topics of pydoc_data. One in ten
(by a hash of the name) is held out. A SentencePiece tokenizer is trained on the training replies
(synth.train_tokenizer), a LLaMA (hidden 384, MLP 1024: int4 groups of 128 fit exactly) is
initialised at random and fully fine-tuned from scratch with `vicunaflow finetune` (the project's
own trainer: the numbers then hold for the models this workflow makes). Then `vicunaflow eval loss`
(loss on the replies only, as training) measures the held-out perplexity in float32 (the reference),
bfloat16, float16, and with `--load-8bit` / `--load-4bit`: the interface a user touches.
Goals: int8 within +0.5% and int4 within +5% of float32's perplexity.

--shape 7b (one GPU; `--shape tiny --device cpu` is the CPU smoke test): a random LLaMA of the real
shape made on the device (engine RandomWeights, as bench_chat.py), loaded as chat loads it in
float16, then with --load-8bit and --load-4bit (and bfloat16, for scale, and int4 as --load-4bit runs on
CUDA by default: torch's tinygemm kernel, the model in bfloat16), one at a time. Random
prompts are teacher-forced through two paths of the engine: the decode path chat uses (engine
Runner, one token a step, CUDA graphs and the Triton matvec kernels on a GPU) and the prefill path
(one forward, every position's logits as the prompt log-probabilities are computed). Against
float16's logits on the same path: max abs error, mean relative error per position
(||l - l_ref|| / ||l_ref||), KL(ref || variant) and greedy (top-1) agreement.

    python bench/quant_quality.py --train                                   # -> results/quant_quality.json
    python bench/quant_quality.py --shape 7b                                # -> results/quant_quality_7b.json
    python bench/quant_quality.py --shape tiny --device cpu --prompts 2 --length 24 --output /tmp/q.json
    python bench/quant_quality.py --kv-cache       # after --train: perplexity, KV cache float32 and float8
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# --- part 1: the trained model and its perplexity -------------------------------------------------

# Modules whose public functions, classes and methods give the conversations (sorted; those missing
# from a Python build are skipped). Chosen for plain-English docstrings, none with import side effects.
MODULES = sorted(
    [
        "abc",
        "argparse",
        "array",
        "ast",
        "asyncio",
        "base64",
        "bisect",
        "bz2",
        "calendar",
        "cmath",
        "codecs",
        "collections",
        "colorsys",
        "concurrent.futures",
        "configparser",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "dis",
        "email",
        "enum",
        "filecmp",
        "fnmatch",
        "fractions",
        "ftplib",
        "functools",
        "getpass",
        "gettext",
        "glob",
        "gzip",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "html.parser",
        "http.client",
        "http.cookies",
        "imaplib",
        "inspect",
        "io",
        "ipaddress",
        "itertools",
        "json",
        "keyword",
        "linecache",
        "locale",
        "logging",
        "lzma",
        "mailbox",
        "math",
        "mimetypes",
        "numbers",
        "operator",
        "os",
        "os.path",
        "pathlib",
        "pickle",
        "platform",
        "plistlib",
        "poplib",
        "pprint",
        "queue",
        "quopri",
        "random",
        "re",
        "reprlib",
        "sched",
        "secrets",
        "selectors",
        "shelve",
        "shlex",
        "shutil",
        "signal",
        "smtplib",
        "socket",
        "sqlite3",
        "stat",
        "statistics",
        "string",
        "struct",
        "subprocess",
        "sysconfig",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "time",
        "timeit",
        "token",
        "tokenize",
        "traceback",
        "types",
        "typing",
        "unicodedata",
        "unittest",
        "urllib.parse",
        "urllib.request",
        "uuid",
        "warnings",
        "wave",
        "weakref",
        "xml.dom.minidom",
        "xml.etree.ElementTree",
        "zipfile",
        "zlib",
    ]
)
HELD_OUT_ONE_IN = 10  # crc32(name) % 10 == 0: held out
REPLY_CHARS = 1200  # replies are cut at a paragraph (else a line) boundary before this many characters
MIN_DOC_CHARS = 40
# The model: hidden sizes multiples of 128, so every int4 group is a whole group of 128.
MODEL = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6}
VOCAB_SIZE = 2048
MAX_LENGTH = 512  # training and evaluation truncate (and pack) to this many tokens
EPOCHS = 1.5  # ~740k tokens: ~6 minutes on 2 idle CPU cores (~2,300 tokens/s)
TRAIN_OPTIONS = [  # `vicunaflow finetune`: a from-scratch run (the number of epochs comes first, --epochs)
    "--method", "full", "--per-device-train-batch-size", "8",
    "--gradient-accumulation-steps", "1", "--learning-rate", "2e-3", "--weight-decay", "0.1",
    "--warmup-ratio", "0.05", "--lr-scheduler-type", "cosine", "--model-max-length", str(MAX_LENGTH),
    "--packing", "true", "--gradient-checkpointing", "false", "--bf16", "false", "--save-strategy", "no",
    "--report-to", "none", "--logging-steps", "10", "--seed", "0",
]  # fmt: skip
# (name, eval loss options, reference name, goal: largest allowed relative perplexity change)
VARIANTS = [
    ("float32", ["--dtype", "float32"], None, None),
    ("int8", ["--dtype", "float32", "--load-8bit"], "float32", 0.005),
    ("int4", ["--dtype", "float32", "--load-4bit"], "float32", 0.05),
]
# Half-precision activations, as on a GPU; on a CPU half-precision matmuls are slow: only with --half
HALF_VARIANTS = [
    ("bfloat16", ["--dtype", "bfloat16"], "float32", None),
    ("float16", ["--dtype", "float16"], "float32", None),
    ("int8, float16 activations", ["--dtype", "float16", "--load-8bit"], "float16", 0.005),
    ("int4, float16 activations", ["--dtype", "float16", "--load-4bit"], "float16", 0.05),
]


def cut(text: str, limit: int = REPLY_CHARS) -> str:
    """`text` whole if short, else up to the last paragraph (or line) break before `limit`."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    for sep in ("\n\n", "\n", ". "):
        at = head.rfind(sep)
        if at > limit // 3:
            return head[:at].rstrip(" .") + ("." if sep == ". " else "")
    return head


def conversation(name: str, question: str, answer: str) -> dict:
    answer = re.sub(r" at 0x[0-9a-fA-F]+", "", answer)  # `<object object at 0x7f...>` defaults differ each run
    return {
        "id": name,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": cut(answer)}],
    }


def stdlib_conversations() -> list[dict]:
    """Questions about the standard library answered by its own docs: deterministic for one Python version.

    Made in a fresh interpreter (-I): importing torch replaces inspect.getfile, so in this process the
    data would depend on what was imported before.
    """
    code = (
        f"import json, runpy, sys; json.dump(runpy.run_path({str(Path(__file__))!r})['_conversations'](), sys.stdout)"
    )
    made = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False)
    if made.returncode:
        raise RuntimeError(f"making the conversations failed:\n{made.stderr[-3000:]}")
    return json.loads(made.stdout)


def _conversations() -> list[dict]:
    import pydoc_data.topics

    records, seen = [], set()

    def add(name: str, question: str, doc: str | None, heading: str = "") -> None:
        if not doc or len(doc) < MIN_DOC_CHARS or doc in seen:  # inherited docstrings come once
            return
        seen.add(doc)
        records.append(conversation(name, question, heading + doc))

    def signature(name: str, obj) -> str:
        try:
            return f"`{name}{inspect.signature(obj)}`\n\n"
        except (TypeError, ValueError):
            return ""

    for module_name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        add(module_name, f"What is the `{module_name}` module for?", inspect.getdoc(module))
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(public):
            obj = getattr(module, name, None)
            if obj is None or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            qualified = f"{module_name}.{name}"
            kind = "class" if inspect.isclass(obj) else "function"
            ask = f"What is the `{qualified}` class?" if kind == "class" else f"What does `{qualified}` do?"
            add(qualified, ask, inspect.getdoc(obj), signature(name, obj))
            if kind == "class":
                for method in sorted(vars(obj)):
                    member = vars(obj)[method]
                    if method.startswith("_") or not (
                        inspect.isroutine(member) or isinstance(member, property | classmethod | staticmethod)
                    ):
                        continue
                    bound = getattr(obj, method, member)
                    heading = "" if isinstance(member, property) else signature(method, bound)
                    add(
                        f"{qualified}.{method}", f"What does `{qualified}.{method}` do?", inspect.getdoc(bound), heading
                    )
    for topic in sorted(pydoc_data.topics.topics):
        add(f"topic:{topic}", f"Explain `{topic}` from the Python language reference.", pydoc_data.topics.topics[topic])
    return records


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): one in HELD_OUT_ONE_IN by a hash of the name, so adding a module moves nothing else."""
    held = [r for r in records if zlib.crc32(r["id"].encode()) % HELD_OUT_ONE_IN == 0]
    return [r for r in records if zlib.crc32(r["id"].encode()) % HELD_OUT_ONE_IN != 0], held


def vicunaflow(*argv: str, log: Path) -> None:
    """Run a `vicunaflow` verb as a user would, in a child process; its log goes to `log`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "vicunaflow", *argv]
    print("$ vicunaflow " + " ".join(argv), flush=True)
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode:
        sys.exit(f"vicunaflow {argv[0]} failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}")


def init_model(folder: Path, tokenizer_model: bytes) -> None:
    """A freshly initialised float32 LLaMA (seed 0) with the bench's tokenizer: what finetune starts from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicunaflow.tokenizer import write_tokenizer

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **MODEL,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    write_tokenizer(folder / "tokenizer.model", folder, MAX_LENGTH)


def train_and_measure(args) -> dict:
    from vicunaflow.synth import train_tokenizer
    from vicunaflow.template import SYSTEM_PROMPT

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = split(stdlib_conversations())
    data_files = {"train": work / "train.json", "held_out": work / "held_out.json"}
    for key, records in (("train", train), ("held_out", held_out)):
        data_files[key].write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(train)} training and {len(held_out)} held-out conversations", flush=True)

    initial, trained = work / "initial", work / "trained"
    record = work / "training.json"  # how the model in `trained` was made: kept for a rerun that reuses it
    if (trained / "config.json").exists() and record.exists() and not args.retrain:
        print(f"reusing {trained} (--retrain to train again)", flush=True)
        training = json.loads(record.read_text())
    else:
        import shutil

        for folder in (initial, trained):
            shutil.rmtree(folder, ignore_errors=True)
        lines = [SYSTEM_PROMPT, "USER: ASSISTANT:"]
        lines += [turn["value"] for r in train for turn in r["conversations"]]
        init_model(initial, train_tokenizer(VOCAB_SIZE, corpus=lines))
        started, cpu_started = time.perf_counter(), children_cpu_seconds()
        vicunaflow(
            "finetune", "--model-path", str(initial), "--data", str(data_files["train"]),
            "--output-dir", str(trained), *train_options(args.epochs), log=work / "finetune.log",
        )  # fmt: skip
        log_lines = (trained / "trainer_log.jsonl").read_text().splitlines()
        train_log = [json.loads(line) for line in log_lines]
        training = {
            "command": "vicunaflow finetune --model-path initial --data train.json --output-dir trained "
            + " ".join(train_options(args.epochs)),
            "seconds": round(time.perf_counter() - started, 1),
            # user + system CPU of the trainer: what a shared machine's other jobs do not change much
            "cpu_seconds": round(children_cpu_seconds() - cpu_started, 1),
            "steps": train_log[-1]["step"],
            "first_loss": train_log[0]["loss"],
            "last_loss": train_log[-1]["loss"],
        }
        record.write_text(json.dumps(training, indent=1) + "\n")

    rows = {}
    half = args.half or args.device == "cuda"
    for name, options, reference, goal in VARIANTS + (HALF_VARIANTS if half else []):
        out = work / f"loss-{name.replace(', ', '-').replace(' ', '_')}.json"
        started = time.perf_counter()
        vicunaflow(
            "eval", "loss", "--model-path", str(trained), "--data", str(data_files["held_out"]), "--output", str(out),
            "--model-max-length", str(MAX_LENGTH), "--device", args.device, *options,
            log=out.with_suffix(".log"),
        )  # fmt: skip
        result = json.loads(out.read_text())
        row = {
            "command": "vicunaflow eval loss --model-path trained --data held_out.json "
            f"--model-max-length {MAX_LENGTH} --device {args.device} " + " ".join(options),
            "loss": result["loss"],
            "perplexity": result["perplexity"],
            "tokens": result["tokens"],
            "conversations": result["conversations"],
            "dtype": result.get("dtype"),
            "quantization": result.get("quantization"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if reference:
            change = row["perplexity"] / rows[reference]["perplexity"] - 1
            row |= {"reference": reference, "perplexity_change": change}
            if goal is not None:
                row |= {"goal": goal, "met": change <= goal}
        rows[name] = row
        shown = f"{row.get('perplexity_change', 0):+.3%} vs {reference}" if reference else "reference"
        print(f"{name:28s} perplexity {row['perplexity']:.4f} ({shown})", flush=True)

    import torch
    import transformers

    return {
        "part": "perplexity on held-out conversations of a model trained for the bench",
        "machine": machine(args.device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "data": {
            "source": f"Python {platform.python_version()} standard library docstrings, module docs and pydoc_data topics",
            "train_conversations": len(train),
            "held_out_conversations": len(held_out),
            "held_out_sha256": sha256(data_files["held_out"]),
            "train_sha256": sha256(data_files["train"]),
        },
        "model": MODEL | {"vocab_size": VOCAB_SIZE, "parameters": parameters(trained)},
        "training": training,
        "variants": rows,
        "control": layers_zeroed(trained, data_files["held_out"], rows["float32"]["tokens"]),
    }


def layers_zeroed(trained: Path, held_out: Path, tokens: int) -> dict:
    """Perplexity with every quantized weight zeroed (each block then adds nothing: embeddings straight into
    lm_head): how much the layers carry at all, so that small int8 / int4 changes can be judged. In process,
    with eval loss's own tokenisation and loss (vicunaflow.eval.loss.sample_losses)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicunaflow import quant
    from vicunaflow.data import encode_all, load_conversations, load_tokenizer
    from vicunaflow.eval.loss import sample_losses

    model = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if quant.QUANTIZED_WEIGHT.fullmatch(name):
                weight.zero_()
    samples = encode_all(load_conversations(held_out), load_tokenizer(trained), MAX_LENGTH)
    per_sample = sample_losses(model, samples, batch_size=4)
    counted = sum(n for _, n in per_sample)
    if counted != tokens:
        raise RuntimeError(f"the control counted {counted} reply tokens, eval loss {tokens}")
    loss = sum(nll for nll, _ in per_sample) / counted
    print(f"{'control: layers zeroed':28s} perplexity {math.exp(loss):.4f}", flush=True)
    return {"layers_zeroed": {"loss": loss, "perplexity": math.exp(loss), "tokens": counted}}


def train_options(epochs: float) -> list[str]:
    return ["--num-train-epochs", f"{epochs:g}", *TRAIN_OPTIONS]


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parameters(folder: Path) -> int:
    from vicunaflow.checkpoint import Checkpoint

    with Checkpoint(folder) as reader:
        return sum(math.prod(reader.info(n).shape) for n in reader.names())


def sha256(path: Path) -> str:
    from vicunaflow.outputs import sha256_file

    return sha256_file(path)


# --- part 2: logits of the engine at real shapes ---------------------------------------------------


def model_args(shape: str):
    """The engine's ModelArgs of a size from vicunaflow.sizes (32000 tokens; tiny: its own 1024)."""
    from vicunaflow.engine import ModelArgs
    from vicunaflow.formats import ffn_hidden_dim
    from vicunaflow.sizes import get_size

    size = get_size(shape)
    return ModelArgs(
        dim=size.dim, n_layers=size.n_layers, n_heads=size.n_heads, n_kv_heads=size.n_heads,
        ffn_dim=ffn_hidden_dim(size.dim, size.multiple_of), vocab_size=size.vocab_size, norm_eps=size.norm_eps,
    )  # fmt: skip


def teacher_forced_logits(model, prompts, device: str, kv_cache_dtype: str = "auto") -> dict:
    """Per path, every position's logits [prompts, T, vocab] (host, model dtype) of each prompt fed whole.

    decode: the engine's Runner steps one token at a time (what chat does after the first token: CUDA
    graphs and the Triton matvec kernels on a GPU); position 0 comes from a one-token prefill.
    prefill: one forward of the prompt; every position's hidden state (the last layer's output, as the
    runner takes it for prompt log-probabilities) projected through the final norm and lm_head.
    """
    import torch

    from vicunaflow import kernels
    from vicunaflow.engine.runner import Runner

    cuda = device == "cuda"
    length = prompts.shape[1]
    runner = Runner(
        model, slots=1, context=length, cuda_graphs=cuda, padded=cuda, kernels=cuda and kernels.available(),
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    decode, prefill = [], []
    with torch.inference_mode():
        for prompt in prompts.tolist():
            first, _ = runner.prefill([prompt[:1]], first_row=0)
            steps = [first[0].cpu()]
            for t in range(1, length):
                logits, _ = runner.step([prompt[t]], [t])  # [1, vocab]: the graph's buffer, copied out
                steps.append(logits[0].cpu())
            decode.append(torch.stack(steps))  # [T, vocab]
            prefill.append(prefill_logits(runner, model, prompt))
    del runner
    return {"decode": torch.stack(decode), "prefill": torch.stack(prefill)}


def prefill_logits(runner, model, prompt: list[int]):
    """Every position's logits [T, vocab] (host) of one prefill forward of the prompt in cache row 0: the last
    layer's output (as the runner takes it for prompt log-probabilities) through the final norm and lm_head. The
    forward writes the prompt's keys and values to the cache and attends over what the cache then holds."""
    from vicunaflow.engine.model import project

    captured = []
    hook = model.layers[-1].register_forward_hook(lambda module, args, out, into=captured: into.append(out))
    try:
        runner.prefill([prompt], first_row=0)
    finally:
        hook.remove()
    hidden = captured[0].view(len(prompt), -1)  # [T, dim]
    return project(hidden, model.output, norm=(model.norm, model.args.norm_eps)).cpu()


def kv_cache_perplexity(args) -> dict:
    """Held-out perplexity of --train's model through the engine with its KV cache in float32 and in float8
    (serve's --kv-cache-dtype fp8), on the CPU: each conversation prefilled in one forward (prefill_logits), the
    loss on the reply tokens as `vicunaflow eval loss` counts it (its float32 number, from transformers, beside)."""
    import torch

    from vicunaflow.data import IGNORE_INDEX, encode_all, load_conversations, load_tokenizer
    from vicunaflow.engine import load_model
    from vicunaflow.engine.runner import Runner

    trained, held_out = args.workdir / "trained", args.workdir / "held_out.json"
    if not trained.is_dir():
        raise SystemExit(f"{trained}: no trained model; run --train first")
    reference = json.loads((args.workdir / "loss-float32.json").read_text())  # eval loss's run: its truncation too
    model, _ = load_model(trained, device="cpu", dtype="float32")
    tokenizer, length = load_tokenizer(trained), reference["model_max_length"]
    samples = encode_all(load_conversations(held_out), tokenizer, length, drop_untrained=False)
    samples = [s for s in samples if any(label != IGNORE_INDEX for label in s.labels)]
    context = max(len(s.input_ids) for s in samples)
    rows = {}
    for kv_dtype in ("auto", "fp8"):
        started = time.perf_counter()
        runner = Runner(model, 1, context, cuda_graphs=False, padded=False, kernels=False, kv_cache_dtype=kv_dtype)
        total, tokens = 0.0, 0
        with torch.inference_mode():
            for sample in samples:
                logits = prefill_logits(runner, model, sample.input_ids)  # [T, vocab]
                targets = torch.tensor(sample.labels[1:])  # token t + 1 from positions <= t, as in training
                nll = torch.nn.functional.cross_entropy(
                    logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum"
                )
                total += float(nll)
                tokens += int((targets != IGNORE_INDEX).sum())
        del runner
        rows[kv_dtype] = {
            "loss": total / tokens, "perplexity": math.exp(total / tokens), "tokens": tokens,
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        print(f"KV cache {kv_dtype}: perplexity {rows[kv_dtype]['perplexity']:.4f} over {tokens} tokens", flush=True)
    return {
        "part": "held-out perplexity of the trained model through the engine, KV cache float32 against float8",
        "machine": machine("cpu"),
        "model": str(trained),
        "held_out_sha256": sha256(held_out),
        "conversations": len(samples),
        "model_max_length": length,
        "eval_loss_float32": {key: reference[key] for key in ("perplexity", "tokens", "conversations")},
        "kv_cache": rows,
        "fp8_over_float32": rows["fp8"]["perplexity"] / rows["auto"]["perplexity"] - 1,
    }


def compare(logits, reference) -> dict:
    """Errors of logits [P, T, V] against the reference's, in float32."""
    import torch

    errors = {"max_abs_error": 0.0, "mean_abs_error": 0.0, "relative": [], "kl": [], "agree": [], "top5": []}
    for got, ref in zip(logits, reference, strict=True):  # one prompt at a time: [T, V]
        got, ref = got.float(), ref.float()
        diff = got - ref
        errors["max_abs_error"] = max(errors["max_abs_error"], float(diff.abs().max()))
        errors["mean_abs_error"] += float(diff.abs().mean()) / len(logits)
        errors["relative"].append(diff.norm(dim=-1) / ref.norm(dim=-1))  # [T]
        log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
        errors["kl"].append((log_p.exp() * (log_p - log_q)).sum(-1))  # [T]
        ref_top = ref.argmax(-1)  # [T]
        errors["agree"].append(got.argmax(-1) == ref_top)
        errors["top5"].append((got.topk(5, dim=-1).indices == ref_top[:, None]).any(-1))
    flat = {k: torch.cat(v).double() for k, v in errors.items() if isinstance(v, list)}
    return {
        "max_abs_error": errors["max_abs_error"],
        "mean_abs_error": errors["mean_abs_error"],
        "mean_relative_error": float(flat["relative"].mean()),
        "max_relative_error": float(flat["relative"].max()),
        "mean_kl": float(flat["kl"].mean()),
        "greedy_agreement": float(flat["agree"].mean()),
        "reference_top1_in_top5": float(flat["top5"].mean()),
    }


def measure_logits(args) -> dict:
    import torch

    from vicunaflow import quant_kernels
    from vicunaflow.engine import RandomWeights, load_model, resolve_device

    device = resolve_device(args.device, 1)
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device == "cuda" else "float32")
    shape = model_args(args.shape)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape.vocab_size, (args.prompts, args.length), generator=generator)  # [P, T]
    # (name, dtype, bits, int4 kernel, int8 math, KV cache dtype): int4 in `dtype` through quant_kernels, and on
    # CUDA as --load-4bit runs it by default (torch's tinygemm, the model in bfloat16); int8's one-row products in
    # float16 pairs (the default) and through float32 (quant_kernels.INT8_MATH), so the pairs' own error shows beside
    # int8's; float weights with serve's --kv-cache-dtype fp8
    variants = [
        (dtype, dtype, None, None, "half2", "auto"),
        ("int8", dtype, 8, None, "half2", "auto"),
        ("int4", dtype, 4, "triton", "half2", "auto"),
        ("kv-fp8", dtype, None, None, "half2", "fp8"),
    ]
    if device == "cuda" and dtype == "float16":
        variants.append(("int8-float32", dtype, 8, None, "float32", "auto"))
        variants.append(("bfloat16", "bfloat16", None, None, "half2", "auto"))  # for scale: a change of format alone
        variants.append(("int4-tinygemm", "bfloat16", 4, "tinygemm", "half2", "auto"))
    if args.variants:  # the reference (the first) always runs
        unknown = set(args.variants) - {variant[0] for variant in variants[1:]}
        if unknown:
            raise SystemExit(f"--variants {' '.join(sorted(unknown))}: not among {[v[0] for v in variants[1:]]}")
        variants = variants[:1] + [variant for variant in variants[1:] if variant[0] in args.variants]
    reference, rows = None, {}
    for name, variant_dtype, bits, int4_kernel, int8_math, kv_dtype in variants:
        started = time.perf_counter()
        quant_kernels.INT8_MATH = int8_math
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, _ = load_model(
            RandomWeights(shape, seed=0), device=device, dtype=variant_dtype, load_8bit=bits == 8, load_4bit=bits == 4,
            int4_kernel=int4_kernel,
        )  # fmt: skip
        row = {"dtype": variant_dtype, "bits": bits, "weight_gib": model.weight_bytes() / 2**30}
        row |= {"int8_math": int8_math} if bits == 8 else {}
        row |= {"kv_cache_dtype": kv_dtype}
        logits = teacher_forced_logits(model, prompts, device, kv_dtype)
        if device == "cuda":
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if reference is None:
            reference = logits
            row |= {"reference": True, "decode_vs_prefill": compare(logits["decode"], logits["prefill"])}
            row |= {
                "logit_std": float(logits["prefill"].float().std()),
                "logit_max": float(logits["prefill"].abs().max()),
            }
        else:
            row |= {path: compare(logits[path], reference[path]) for path in ("decode", "prefill")}
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows[name] = row
        summary = row.get("decode") or row["decode_vs_prefill"]
        print(
            f"{name:9s} {row['weight_gib']:.2f} GiB  decode: max abs {summary['max_abs_error']:.4f}, mean rel "
            f"{summary['mean_relative_error']:.4%}, greedy agreement {summary['greedy_agreement']:.2%}"
            + ("  (float decode vs prefill)" if "decode_vs_prefill" in row else ""),
            flush=True,
        )
    info = {
        "part": "engine logits at real shapes, random weights, against the float model on the same path",
        "machine": machine(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "shape": {"name": args.shape}
        | {k: getattr(shape, k) for k in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size")},
        "weights": "RandomWeights(seed 0, std 0.02), drawn on the device",
        "prompts": args.prompts,
        "length": args.length,
        "prompt_tokens": "uniform random ids in [3, vocab) (seed 0), teacher-forced",
        "reference": f"{dtype} engine",
        "variants": rows,
    }
    return info


def machine(device: str) -> dict:
    import torch

    described = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": device}
    if device == "cuda":
        described["gpu"] = torch.cuda.get_device_name()
    else:
        described["torch_threads"] = torch.get_num_threads()
    return described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    part = parser.add_mutually_exclusive_group(required=True)
    part.add_argument("--train", action="store_true", help="train the bench's model, then measure perplexity")
    part.add_argument("--shape", help="measure engine logits on a random model of this size (7b, 13b, tiny)")
    part.add_argument(
        "--kv-cache",
        action="store_true",
        help="--train's model: held-out perplexity with a float32 and a float8 KV cache",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: cpu for --train, auto for --shape)")
    parser.add_argument(
        "--dtype", default="auto", help="--shape: the reference (auto: float16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--prompts", type=int, default=8, help="--shape: prompts")
    parser.add_argument("--variants", nargs="+", help="--shape: only these beside the reference (int8, kv-fp8, ...)")
    parser.add_argument("--length", type=int, default=256, help="--shape: tokens a prompt")
    parser.add_argument(
        "--workdir", type=Path, default=REPO / ".work" / "quant_quality", help="--train: data and models"
    )
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="--train: passes over the training conversations")
    parser.add_argument("--half", action="store_true", help="--train: also bfloat16/float16 (default on CUDA)")
    parser.add_argument("--retrain", action="store_true", help="--train: train again even if the model exists")
    parser.add_argument("--output", type=Path, help="JSON to write (default: results/quant_quality[_SHAPE].json)")
    args = parser.parse_args()

    if args.train:
        args.device = args.device or "cpu"
        result = train_and_measure(args)
        output = args.output or RESULTS / "quant_quality.json"
    elif args.kv_cache:
        result = kv_cache_perplexity(args)
        output = args.output or RESULTS / "quant_quality_kv_cache.json"
    else:
        args.device = args.device or "auto"
        result = measure_logits(args)
        output = args.output or RESULTS / f"quant_quality_{args.shape}.json"
    result["command"] = "python bench/quant_quality.py " + " ".join(sys.argv[1:])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}", flush=True)


if __name__ == "__main__":
    main()
