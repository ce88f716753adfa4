"""Convert and apply-delta: vicunaflow vs transformers' last LLaMA converter and FastChat 0.2.36's apply_delta.

Both sides run on the same synthetic 2-shard float16 checkpoint in Meta's layout (default dim 2048,
22 layers, 16 heads: ~1.1B parameters, the shape of TinyLlama-1.1B) and the same `.bin` delta:

    convert      vicunaflow convert                      vs  transformers 4.46.3's convert_llama_weights_to_hf.py
    apply-delta  vicunaflow apply-delta                  vs  python -m fastchat.model.apply_delta (fschat 0.2.36)

    python bench/bench_convert_merge.py                  # ~1.1B parameters (needs ~8 GB free RAM, ~15 GB disk)
    python bench/bench_convert_merge.py --n-layers 8     # ~0.45B, quicker
    python bench/bench_convert_merge.py --only ours      # skip the reference tools

The reference tools run in their own venvs under .work/ref-venvs/ (created on first use with pip:
transformers==4.46.3, and fschat==0.2.36 with transformers==4.57.1; torch is shared from this venv
through a .pth placed after each venv's own packages). The converter script is read from the
transformers 4.46.3 wheel there; nothing downloaded enters the repository.

Each command runs as a child process; we record wall time and the peak RSS of its whole process
tree (psutil, polled every 20 ms; memory-mapped file pages a process touches count, as they do for
the kernel's OOM accounting). Files are read once before each run so every run starts with a warm
page cache. Each command runs --repeat times (default 2; 1 with --size) and its fastest run counts: other jobs on
a shared machine only ever slow a run down. Results: bench/results/convert_merge.json and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REF_VENVS = REPO / ".work" / "ref-venvs"
GOALS = {"wall_s": 0.5, "peak_rss_mb": 0.3}  # ours / theirs, at most (issue 2, ~1B)
REAL_SIZE_GOALS = {"wall_s": 0.5, "peak_rss_mb": 0.25}  # issue 7, 7B and 13B
MIN_AVAILABLE = 2 * 2**30  # kill a capped run before the machine has less free memory than this
MIN_FREE_DISK = 10e9  # ... or before the disk has less free space than this
AS_MARGIN = 64 * 2**30  # prlimit --as = RSS cap + this: loaders mmap whole checkpoints (13B FastChat maps
# 52 GB), so address space says little about RSS; the RSS watchdog is the cap, --as only a last backstop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n-layers", type=int, default=22)
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / ".work" / "bench-convert-merge")
    parser.add_argument("--only", choices=["ours", "reference"], help="measure one side only")
    parser.add_argument(
        "--repeat", type=int, help="runs per command; the fastest counts (shared machines); default 2, --size: 1"
    )
    parser.add_argument("--output", type=Path, help="default: results/convert_merge.json (_7b.json, _13b.json)")
    parser.add_argument("--size", choices=["7B", "13B"], help="real LLaMA shapes (`vicunaflow synth llama`) instead")
    parser.add_argument(
        "--ref-mem-cap-gib", type=float, default=16.0,
        help="--size: kill a reference tool whose process tree's RSS passes this (other people share the machine)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="--size: keep the big files (default: delete as we go)")
    parser.add_argument(
        "--steps", nargs="+", choices=["convert", "apply-delta"], default=["convert", "apply-delta"],
        help="--size: measure these steps only (13B: each fits one 10-minute call; the base is still built)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.size:
        args.output = args.output or HERE / "results" / f"convert_merge_{args.size.lower()}.json"
        bench_real_size(args)
        return
    args.output = args.output or HERE / "results" / "convert_merge.json"
    args.repeat = args.repeat or 2

    args.workdir.mkdir(parents=True, exist_ok=True)
    raw = make_raw(args.workdir / "raw", args.dim, args.n_layers, args.n_heads, args.shards)
    n_params = count_params(raw)
    print(f"checkpoint: {raw} ({n_params / 1e9:.2f}B parameters, {args.shards} shards, float16)", flush=True)
    sides = ["ours", "reference"] if args.only is None else [args.only]
    if "reference" in sides:
        hf_python, fastchat_python, converter = reference_tools()

    results: dict = {"parameters": n_params, "dim": args.dim, "n_layers": args.n_layers, "shards": args.shards}
    ours_hf, ref_hf = args.workdir / "ours-hf", args.workdir / "ref-hf"
    vf = [sys.executable, "-m", "vicunaflow"]
    runs = {
        ("convert", "ours"): ([*vf, "convert", "--input-dir", str(raw), "--output-dir", str(ours_hf)], raw, ours_hf),
    }
    if "reference" in sides:
        runs[("convert", "reference")] = (
            [hf_python, str(converter), "--input_dir", str(raw), "--num_shards", str(args.shards),
             "--output_dir", str(ref_hf), "--llama_version", "1"],
            raw, ref_hf,
        )  # fmt: skip
    for (step, side), (command, inputs, output) in runs.items():
        results.setdefault(step, {})[side] = measure_repeated(command, inputs, output, args.repeat)

    # The delta is made for our converted base (bit-exact float16), in lmsys's .bin layout.
    delta = args.workdir / "delta"
    if not delta.exists():
        subprocess.run([*vf, "synth", "delta", "--base", str(ours_hf), "--output-dir", str(delta)], check=True)
    ours_target, ref_target = args.workdir / "ours-target", args.workdir / "fastchat-target"
    apply_runs = {
        "ours": (
            [*vf, "apply-delta", "--base", str(ours_hf), "--delta", str(delta), "--target", str(ours_target)],
            ours_target,
        )
    }
    if "reference" in sides:
        apply_runs["reference"] = (
            [fastchat_python, "-m", "fastchat.model.apply_delta", "--base-model-path", str(ours_hf),
             "--delta-path", str(delta), "--target-model-path", str(ref_target)],
            ref_target,
        )  # fmt: skip
    for side, (command, output) in apply_runs.items():
        results.setdefault("apply-delta", {})[side] = measure_repeated(command, [ours_hf, delta], output, args.repeat)

    if "reference" in sides:
        results["convert"]["agreement"] = compare(ours_hf, ref_hf)
        results["apply-delta"]["agreement"] = compare(ours_target, ref_target)
        for step in ("convert", "apply-delta"):
            ours, ref = results[step]["ours"], results[step]["reference"]
            results[step]["ratios"] = {k: round(ours[k] / ref[k], 3) for k in GOALS}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    results["machine"] = {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    results["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {args.output}")


# --- real sizes: 7B and 13B --------------------------------------------------------------------


def bench_real_size(args) -> None:
    """Convert and apply-delta at LLaMA-7B / 13B shapes, reference tools under a memory cap.

    Disk is the constraint here (13B: 26 GB a copy), so big files go as soon as they are checked:
    raw -> ours-hf (checked against the merged raw tensors) -> reference convert (compared, deleted)
    -> raw deleted -> delta -> apply-delta both sides (checked against base + delta, recomputed).
    The delta is lmsys's `.bin` layout from `vicunaflow synth delta`; when the disk cannot hold a
    delta beside base and target (13B on an ~80 GB disk), the base itself serves as the delta
    (its safetensors files linked into a delta folder; target = 2 x base), and the JSON says so.
    """
    workdir = (
        args.workdir
        if args.workdir != REPO / ".work" / "bench-convert-merge"
        else REPO / ".work" / f"bench-{args.size.lower()}"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    cap = int(args.ref_mem_cap_gib * 2**30)
    repeat = args.repeat or 1  # a 13B run takes ~20 min; the references run once anyway (they may not fit)
    vf = [sys.executable, "-m", "vicunaflow"]
    raw = workdir / "pyllama_data" / args.size
    ours_hf, ref_hf = workdir / "ours-hf", workdir / "ref-hf"
    results: dict = {"size": args.size, "machine": machine(), "reference_mem_cap_gib": args.ref_mem_cap_gib}
    results["command"] = " ".join(["python", "bench/bench_convert_merge.py", *sys.argv[1:]])
    sides = ["ours", "reference"] if args.only is None else [args.only]

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")

    if not (raw / "params.json").exists() and not (ours_hf / "config.json").exists():
        started = time.perf_counter()
        subprocess.run([*vf, "synth", "llama", "--folder", str(raw.parent), "--model-size", args.size], check=True)
        results["synth_s"] = round(time.perf_counter() - started, 1)
    if (raw / "params.json").exists():
        params = json.loads((raw / "params.json").read_text())
        results["checkpoint"] = {"params_json": params, "shards": len(list(raw.glob("consolidated.*.pth")))}
        print(f"checkpoint: {raw} {results['checkpoint']}", flush=True)
        command = [*vf, "convert", "--input-dir", str(raw), "--output-dir", str(ours_hf)]
        if "convert" in args.steps:
            convert = results["convert"] = {}
            convert["ours"] = measure_repeated(command, raw, ours_hf, repeat) | {"command": shell(command)}
            convert["ours_vs_raw"] = check_convert(raw, ours_hf)
            save()
            if "reference" in sides:
                hf_python, _, converter = reference_tools()
                command = [hf_python, str(converter), "--input_dir", str(raw), "--num_shards",
                           str(results["checkpoint"]["shards"]), "--output_dir", str(ref_hf), "--llama_version", "1"]  # fmt: skip
                convert["reference"] = measure(command, raw, ref_hf, mem_cap=cap) | {"command": shell(command)}
                if convert["reference"]["completed"]:
                    convert["ours_vs_reference"] = compare(ours_hf, ref_hf)
                shutil.rmtree(ref_hf, ignore_errors=True)
                convert["ratios"] = ratios(convert["ours"], convert["reference"])
            save()
        elif not (ours_hf / "config.json").exists():
            subprocess.run(command, check=True)  # only the base apply-delta needs: not measured
        if not args.keep:
            shutil.rmtree(raw, ignore_errors=True)
    if "apply-delta" not in args.steps:
        print(json.dumps(results, indent=2))
        print(f"\nwrote {args.output}")
        return

    delta = workdir / "delta"
    if not (delta / "config.json").exists():
        base_bytes = dir_size(ours_hf)
        if free_disk(workdir) - 2 * base_bytes > 12e9:
            subprocess.run([*vf, "synth", "delta", "--base", str(ours_hf), "--output-dir", str(delta)], check=True)
        else:
            link_base_as_delta(ours_hf, delta)
    results["delta"] = (
        "the base's own safetensors files, linked (no disk for a separate delta)"
        if (delta / "model.safetensors.index.json").exists()
        else "vicunaflow synth delta: random, lmsys's pytorch_model-*.bin layout"
    )
    apply = results.setdefault("apply-delta", {})
    ours_target, ref_target = workdir / "ours-target", workdir / "fastchat-target"
    command = [*vf, "apply-delta", "--base", str(ours_hf), "--delta", str(delta), "--target", str(ours_target)]
    apply["ours"] = measure_repeated(command, [ours_hf, delta], ours_target, repeat) | {"command": shell(command)}
    apply["ours_vs_base_plus_delta"] = check_apply_delta(ours_hf, delta, ours_target)
    save()
    if "reference" in sides:
        _, fastchat_python, _ = reference_tools()
        command = [fastchat_python, "-m", "fastchat.model.apply_delta", "--base-model-path", str(ours_hf),
                   "--delta-path", str(delta), "--target-model-path", str(ref_target)]  # fmt: skip
        if free_disk(workdir) - dir_size(ours_hf) < 10e9:
            shutil.rmtree(ours_target)  # checked already; FastChat's output is checked the same way
        apply["reference"] = measure(command, [ours_hf, delta], ref_target, mem_cap=cap) | {"command": shell(command)}
        if apply["reference"]["completed"]:
            apply["reference_vs_base_plus_delta"] = check_apply_delta(ours_hf, delta, ref_target)
        apply["ratios"] = ratios(apply["ours"], apply["reference"])
    save()
    if not args.keep:
        for path in (ours_target, ref_target, delta, ours_hf):
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(results, indent=2))
    print(f"\nwrote {args.output}")


def ratios(ours: dict, reference: dict) -> dict:
    """ours / theirs. A reference killed at the memory cap gives bounds (its time and RSS so far);
    one that failed for another reason gives none."""
    if reference.get("completed"):
        return {k: round(ours[k] / reference[k], 3) for k in REAL_SIZE_GOALS} | {"bound": False}
    if reference.get("why", "").startswith("killed at RSS"):
        return {k: round(ours[k] / reference[k], 3) for k in REAL_SIZE_GOALS} | {"bound": True}
    return {"bound": None, "note": "the reference failed before reaching the cap: no ratio"}


def shell(command: list) -> str:
    return " ".join(str(c).replace(str(REPO) + "/", "") for c in command)


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def machine() -> dict:
    import platform

    import torch

    disk = Path("/sys/block/vda/queue/rotational")
    return {
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
        ),
        "disk": f"virtio block device, rotational={disk.read_text().strip()}" if disk.exists() else "?",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "reference_venvs": {name: pip_versions(REF_VENVS / name) for name in ("hf4463", "fschat")},
    }


def pip_versions(venv: Path) -> dict:
    python = venv / "bin" / "python"
    if not python.exists():
        return {}
    code = (
        "import importlib.metadata as m\n"
        "for p in ('transformers', 'fschat', 'accelerate', 'safetensors', 'torch'):\n"
        "    try: print(p, m.version(p))\n"
        "    except Exception: pass"
    )
    lines = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.split("\n")
    return dict(line.split() for line in lines if line.strip())


def link_base_as_delta(base: Path, delta: Path) -> None:
    """A delta folder whose weights are the base's own safetensors files (symlinks)."""
    delta.mkdir(parents=True)
    for path in base.iterdir():
        if path.suffix == ".safetensors":
            (delta / path.name).symlink_to(path.resolve())
        elif path.is_file():
            shutil.copy(path, delta / path.name)


def check_convert(raw: Path, hf: Path) -> dict:
    """Every HF tensor equals the merged (and, for q/k, rotary-permuted) raw tensor, bit for bit.

    Written here from the LLaMA layout, not with vicunaflow.formats, so it checks that code too.
    """
    import torch
    from safetensors import safe_open

    params = json.loads((raw / "params.json").read_text())
    n_heads, dim = params["n_heads"], params["dim"]
    shards = [
        torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in sorted(raw.glob("consolidated.*.pth"))
    ]
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    files = {name: safe_open(hf / name, framework="pt") for name in set(index.values())}
    concat_dim = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}
    hf_name = {
        "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight", "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    }  # fmt: skip
    checked, mismatched, elements = 0, [], 0
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            target = f"model.layers.{layer}.{hf_name[rest]}"
        else:
            target = hf_name[name]
        kind = name.split(".")[-2]
        parts = [shard[name] for shard in shards]
        merged = torch.cat(parts, dim=concat_dim[kind]) if kind in concat_dim and len(parts) > 1 else parts[0]
        if kind in ("wq", "wk"):  # Meta's interleaved rotary pairs -> HF's two halves, per head
            rows = merged.shape[0]
            merged = merged.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)
        ours = files[index.pop(target)].get_tensor(target)
        same = (
            ours.dtype == merged.dtype
            and ours.shape == merged.shape
            and torch.equal(ours.view(torch.int16), merged.contiguous().view(torch.int16))
        )
        checked += 1
        elements += merged.numel()
        if not same:
            mismatched.append(target)
        if target == "model.embed_tokens.weight":
            vocab_rows = ours.shape[0]
    return {
        "tensors_checked": checked,
        "elements": elements,
        "dtype": str(ours.dtype),
        "vocab_rows": vocab_rows,
        "extra_in_output": sorted(index)[:5],
        "mismatched": mismatched[:5],
        "bit_exact": not mismatched and not index,
    }


def check_apply_delta(base: Path, delta: Path, target: Path) -> dict:
    """Every target tensor == float16(float32(base) + float32(delta)), bit for bit, recomputed here."""
    import torch

    from vicunaflow.checkpoint import Checkpoint

    b, d, t = Checkpoint(base), Checkpoint(delta), Checkpoint(target)
    mismatched, elements = [], 0
    for name in b.names():
        x, y, z = b.get(name), d.get(name), t.get(name)
        expected = (x.float() + y.float()).to(x.dtype)
        elements += z.numel()
        if not (
            z.dtype == expected.dtype
            and z.shape == expected.shape
            and torch.equal(z.view(torch.int16), expected.view(torch.int16))
        ):
            mismatched.append(name)
    return {
        "tensors_checked": len(b.names()),
        "elements": elements,
        "dtype": str(z.dtype),
        "same_names": sorted(b.names()) == sorted(t.names()),
        "mismatched": mismatched[:5],
        "bit_exact": not mismatched and sorted(b.names()) == sorted(t.names()),
    }


# --- the checkpoint ---------------------------------------------------------------------------


def make_raw(out: Path, dim: int, n_layers: int, n_heads: int, shards: int) -> Path:
    """A random float16 checkpoint in Meta's layout, through vicunaflow's own synthesiser (cached)."""
    import torch

    from vicunaflow.synth import _piece_count, train_tokenizer, write_raw_checkpoint

    params = {
        "dim": dim,
        "multiple_of": 256,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "norm_eps": 1e-6,
        "vocab_size": -1,
    }
    if (out / "params.json").exists() and json.loads((out / "params.json").read_text()) == params:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(train_tokenizer(32000))
    write_raw_checkpoint(out, params, _piece_count(out / "tokenizer.model"), shards, torch.float16, seed=0)
    (out / "params.json").write_text(json.dumps(params))
    return out


def count_params(raw: Path) -> int:
    import math

    from vicunaflow.formats import meta_shapes
    from vicunaflow.synth import _piece_count

    shapes = meta_shapes(json.loads((raw / "params.json").read_text()), _piece_count(raw / "tokenizer.model"))
    return sum(math.prod(shape) for shape in shapes.values())


# --- reference tools --------------------------------------------------------------------------


def reference_tools() -> tuple[str, str, Path]:
    """Python of each reference venv (made on first use) and transformers 4.46.3's converter script."""
    hf = make_venv("hf4463", ["transformers==4.46.3", "sentencepiece", "protobuf"])
    fastchat = make_venv("fschat", ["fschat==0.2.36", "transformers==4.57.1", "sentencepiece", "protobuf"])
    script = REF_VENVS / "wheel" / "convert_llama_weights_to_hf.py"
    if not script.exists():
        script.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [hf, "-m", "pip", "download", "-q", "--no-deps", "transformers==4.46.3", "-d", str(script.parent)],
            check=True,
        )
        wheel = next(script.parent.glob("transformers-4.46.3-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            script.write_bytes(z.read("transformers/models/llama/convert_llama_weights_to_hf.py"))
    return hf, fastchat, script


def make_venv(name: str, packages: list[str]) -> str:
    venv = REF_VENVS / name
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating reference venv {venv} ({', '.join(packages)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True)
        # accelerate for low_cpu_mem_usage; without its torch dependency, which would pull a CUDA build.
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "accelerate==1.10.1"], check=True)
        site = subprocess.run(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
        )
        import torch

        torch_site = str(Path(torch.__file__).parents[1])
        Path(site.stdout.strip(), "zz_project_torch.pth").write_text(torch_site + "\n")  # sorted last: own packages win
    return str(python)


# --- measuring --------------------------------------------------------------------------------


def measure_repeated(command: list[str], inputs, output: Path, repeat: int) -> dict:
    """The fastest of `repeat` runs (other jobs only ever slow a run down) and the largest peak RSS."""
    runs = [measure(command, inputs, output) for _ in range(repeat)]
    return {
        "wall_s": min(r["wall_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "output_gb": runs[-1]["output_gb"],
        "runs": runs,
    }


def measure(command: list[str], inputs, output: Path, mem_cap: int | None = None) -> dict:
    """Run `command`, polling the RSS of its process tree; wall time and peak RSS.

    With `mem_cap` (bytes) the command may fail without stopping the benchmark: it is killed when its
    tree's RSS passes the cap or the machine's available memory drops under MIN_AVAILABLE (so a
    reference tool that loads whole models never gets other people's processes OOM-killed), and
    `prlimit --as` backs that up in the kernel. The result then says why and how far it got.
    """
    shutil.rmtree(output, ignore_errors=True)
    for path in inputs if isinstance(inputs, list) else [inputs]:
        warm_page_cache(Path(path))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VICUNAFLOW_LOG_LEVEL": "WARNING"}
    if mem_cap:  # address space, a looser bound than RSS (mapped files, thread stacks): a backstop only
        command = ["prlimit", f"--as={mem_cap + AS_MARGIN}", "--", *command]
    print(f"$ {' '.join(map(str, command))}", flush=True)
    log = output.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=mem_cap is not None
        )
        peak, killed = [0], []
        done = threading.Event()
        watch = (process.pid, peak, done, mem_cap, killed, output.parent)
        threading.Thread(target=poll_rss, args=watch, daemon=True).start()
        returncode = process.wait()
        done.set()
    wall = time.perf_counter() - start
    result = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak[0] / 2**20)}
    if returncode != 0:
        if mem_cap is None:
            raise SystemExit(f"failed ({returncode}): {' '.join(map(str, command))}\n{log.read_text()[-3000:]}")
        shutil.rmtree(output, ignore_errors=True)
        why = killed[0] if killed else f"exit {returncode}: {log.read_text()[-400:].strip()}"
        result |= {"completed": False, "why": why}
        print(f"  did not complete: {result}", flush=True)
        return result
    result |= {"completed": True, "output_gb": round(dir_size(output) / 1e9, 2)}
    print(f"  {result}", flush=True)
    return result


def poll_rss(pid: int, peak: list[int], done: threading.Event, mem_cap=None, killed=None, disk=None) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not done.is_set():
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
        peak[0] = max(peak[0], total)
        if mem_cap is not None and not killed:
            available = psutil.virtual_memory().available
            free = shutil.disk_usage(disk).free
            if total > mem_cap or available < MIN_AVAILABLE or free < MIN_FREE_DISK:
                killed.append(
                    f"killed at RSS {total / 2**30:.1f} GiB (cap {mem_cap / 2**30:.1f} GiB, "
                    f"machine available {available / 2**30:.1f} GiB, free disk {free / 1e9:.0f} GB)"
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        time.sleep(0.02)


def warm_page_cache(path: Path) -> None:
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as handle:
            while handle.read(1 << 24):
                pass


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- checking that both sides computed the same thing ---------------------------------------------


def compare(ours: Path, theirs: Path) -> dict:
    """Dtypes and agreement of two Hugging Face directories, tensor by tensor."""
    from vicunaflow.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    differing = total = 0
    max_abs = 0.0
    for name in a.names():
        x, y = a.get(name), b.get(name)
        total += x.numel()
        differing += int((x.float() != y.float()).sum())
        max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {
        "ours_dtype": str(a.info(a.names()[0]).dtype),
        "theirs_dtype": str(b.info(b.names()[0]).dtype),
        "theirs_config_dtype": json.loads((theirs / "config.json").read_text()).get("torch_dtype"),
        "elements_differing": differing,
        "elements": total,
        "max_abs_difference": max_abs,
        "same_names": sorted(a.names()) == sorted(b.names()),
        "bit_identical": differing == 0 and str(a.info(a.names()[0]).dtype) == str(b.info(b.names()[0]).dtype),
    }


def print_table(results: dict) -> None:
    print(f"\n{'step':<12} {'side':<10} {'wall s':>8} {'peak RSS MB':>12} {'output GB':>10}")
    for step in ("convert", "apply-delta"):
        for side in ("ours", "reference"):
            if side in results.get(step, {}):
                r = results[step][side]
                print(f"{step:<12} {side:<10} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12} {r['output_gb']:>10}")
        if "ratios" in results.get(step, {}):
            verdict = ", ".join(f"{k} {v:.2f}x (goal <= {GOALS[k]})" for k, v in results[step]["ratios"].items())
            print(f"{'':<12} {'ratio':<10} {verdict}")
            print(f"{'':<12} {'check':<10} {json.dumps(results[step]['agreement'])}")


if __name__ == "__main__":
    main()
