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
page cache. Each command runs --repeat times (default 2) and its fastest run counts: other jobs on
a shared machine only ever slow a run down. Results: bench/results/convert_merge.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
GOALS = {"wall_s": 0.5, "peak_rss_mb": 0.3}  # ours / theirs, at most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n-layers", type=int, default=22)
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / ".work" / "bench-convert-merge")
    parser.add_argument("--only", choices=["ours", "reference"], help="measure one side only")
    parser.add_argument("--repeat", type=int, default=2, help="runs per command; the fastest counts (shared machines)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "convert_merge.json")
    args = parser.parse_args()

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


def measure(command: list[str], inputs, output: Path) -> dict:
    """Run `command`, polling the RSS of its process tree; wall time and peak RSS."""
    shutil.rmtree(output, ignore_errors=True)
    for path in inputs if isinstance(inputs, list) else [inputs]:
        warm_page_cache(Path(path))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VICUNAFLOW_LOG_LEVEL": "WARNING"}
    print(f"$ {' '.join(map(str, command))}", flush=True)
    log = output.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        peak = [0]
        done = threading.Event()
        threading.Thread(target=poll_rss, args=(process.pid, peak, done), daemon=True).start()
        returncode = process.wait()
        done.set()
    wall = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"failed ({returncode}): {' '.join(map(str, command))}\n{log.read_text()[-3000:]}")
    result = {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak[0] / 2**20),
        "output_gb": round(dir_size(output) / 1e9, 2),
    }
    print(f"  {result}", flush=True)
    return result


def poll_rss(pid: int, peak: list[int], done: threading.Event) -> None:
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
