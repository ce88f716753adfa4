"""The engine's host work per decode step, with the neural network replaced by a stand-in that costs nothing.

What runs is the real Engine: its thread and loop, admission, chunked prefill bookkeeping, the paged KV
cache's block tables, the runner's step inputs (buckets, host buffers, the copy), sampling, stop and
length checks, incremental detokenisation with bench_chat.py's 32000-piece tokenizer, and an Event per
token handed to a sink. Only the forward passes (`Runner._run`: the model and its greedy argmax,
`Runner._prefill`) are replaced: a decode step's greedy tokens are a cheap function of each row's
position (word pieces, and every 16th position the two byte-fallback pieces of "é"), its logits an
expanded row of zeros. The engine is set up as on a GPU: overlap on (one step queued ahead) and padded
row buckets.

Each case submits `rows` requests (128-token prompts, greedy, ignore_eos) and times the loop between
consecutive decode steps while all rows decode: host µs per step and per row-token, and the tokens/s that
host work alone would allow. Runs are repeated and the best kept (the machine may be shared).

    python bench/bench_engine_host.py                       # 1, 8, 32, 64, 256 rows
    python bench/bench_engine_host.py --rows 256 --profile  # and cProfile's top costs at 256 rows
    python bench/bench_engine_host.py --json out.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB = 32000
FIRST_WORD = 300  # bench_chat's tokenizer: 0-2 special, 3-258 bytes, then "▁w<i>" pieces
E_ACUTE = (3 + 0xC3, 3 + 0xA9)  # <0xC3><0xA9>: "é" in byte-fallback pieces


def make_engine(rows: int, tokenizer, *, context: int, overlap: bool):
    from vicunaflow.engine import Engine, ModelArgs, Transformer

    args = ModelArgs(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, vocab_size=VOCAB)
    args = ModelArgs(**{**args.__dict__, "max_position_embeddings": context})
    model = Transformer(args, dtype=torch.float32, device="cpu")
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=rows,
        cuda_graphs=False,
        padded_decode=True,  # as on a GPU: row buckets, reused host buffers
        overlap=overlap,
        warm_up=False,
        seed=0,
    )
    stub_forward(engine.runner)
    return engine


def stub_forward(runner) -> None:
    """Replace the runner's two forwards (the model, and the decode step's argmax) with near-free stand-ins."""
    zeros = torch.zeros(1, VOCAB)
    first = torch.zeros(1, VOCAB)
    first[0, FIRST_WORD + 1] = 1.0  # a prompt's first reply token: a word piece

    def run(bucket: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = bucket["step_inputs"]
        positions = inputs[:, 1]
        phase = positions % 16
        words = FIRST_WORD + (positions * 7919 + torch.arange(len(positions)) * 104729) % (VOCAB - FIRST_WORD)
        greedy = torch.where(phase == 14, E_ACUTE[0], torch.where(phase == 15, E_ACUTE[1], words))
        return zeros.expand(len(positions), VOCAB), greedy

    def prefill(packed: torch.Tensor) -> torch.Tensor:
        return first.expand(packed.shape[0], VOCAB)

    runner._run = run
    runner._prefill = prefill


def measure(engine, prompts: list[list[int]], *, steps: int, warm: int, profile: cProfile.Profile | None) -> dict:
    """Submit one request per prompt; time the decode steps after `warm` ones where every row decodes."""
    from vicunaflow.engine import SamplingParams

    rows = len(prompts)
    marks: list[tuple[float, float, int]] = []  # (perf_counter, thread CPU, rows) at each decode step's start
    enough = threading.Event()
    decode_step = engine._decode_step

    full = 0  # decode steps started with every row decoding

    def timed_step() -> None:
        nonlocal full
        marks.append((time.perf_counter(), time.thread_time(), len(engine.rows)))
        full += len(engine.rows) == rows
        if full == warm + 1 and profile is not None:
            profile.enable()
        if full == warm + steps + 1:
            if profile is not None:
                profile.disable()
            enough.set()
        decode_step()

    engine._decode_step = timed_step
    events: list = []
    sink = events.append  # minimal work per event
    params = SamplingParams(temperature=0.0, max_new_tokens=engine.context - len(prompts[0]) - 1, ignore_eos=True)
    requests = [engine.submit(p, params, sink) for p in prompts]
    if not enough.wait(timeout=600):
        raise RuntimeError("the engine did not reach the steps asked for")
    for request in requests:
        request.cancel()
    engine._decode_step = decode_step
    starts = [i for i in range(len(marks)) if marks[i][2] == rows]
    window = starts[warm + 1 : warm + steps + 1]  # step i lasts from marks[i - 1] to marks[i]
    wall = sum(marks[i][0] - marks[i - 1][0] for i in window)
    cpu = sum(marks[i][1] - marks[i - 1][1] for i in window)
    n = len(window)
    return {
        "rows": rows,
        "steps": n,
        "us_per_step": 1e6 * wall / n,
        "cpu_us_per_step": 1e6 * cpu / n,
        "us_per_row_token": 1e6 * wall / n / rows,
        "host_tokens_per_s": rows * n / wall,
        "events": len(events),
    }


def run_case(rows: int, tokenizer, prompts, args, profile=None) -> dict:
    engine = make_engine(rows, tokenizer, context=args.context, overlap=args.overlap)
    with engine:
        return measure(engine, prompts[:rows], steps=args.steps, warm=args.warm, profile=profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per run (at full batch)")
    parser.add_argument("--warm", type=int, default=20, help="full-batch steps before timing")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row count; the best is kept")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--no-overlap", dest="overlap", action="store_false", help="no step queued ahead")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest row count's steps")
    parser.add_argument("--top", type=int, default=25, help="profile lines shown")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from bench_chat import make_prompts, make_tokenizer

    tokenizer = make_tokenizer(VOCAB)
    prompts = make_prompts(tokenizer, max(args.rows), args.prompt)
    results = []
    print(f"{'rows':>5} {'µs/step':>10} {'cpu µs/step':>12} {'µs/row-token':>13} {'host tokens/s':>14}")
    for rows in args.rows:
        runs = [run_case(rows, tokenizer, prompts, args) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["us_per_step"])
        best["runs_us_per_step"] = [round(r["us_per_step"], 1) for r in runs]
        results.append(best)
        print(
            f"{rows:>5} {best['us_per_step']:>10.1f} {best['cpu_us_per_step']:>12.1f} "
            f"{best['us_per_row_token']:>13.2f} {best['host_tokens_per_s']:>14,.0f}",
            flush=True,
        )
    output = {
        "bench": "engine_host",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }
    if args.profile:
        rows = max(args.rows)
        profile = cProfile.Profile()
        run_case(rows, tokenizer, prompts, args, profile)
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text).strip_dirs().sort_stats("tottime")
        stats.print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        print(f"\ncProfile of the decode steps at {rows} rows (per {args.steps} steps):")
        print(text.getvalue())
        output["profile"] = text.getvalue()
    if args.json:
        args.json.write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    main()
