"""Inference throughput: vicunaflow's batching engine vs transformers' generate vs FastChat's generate_stream.

All sides run the same randomly initialised 7B-shaped LLaMA (float16, SDPA) on one GPU, greedy, with a
fixed prompt length and a fixed reply length (EOS ignored, so every request makes the same number of
tokens):

    single stream   one request; decode tokens/s (after the first token) and end-to-end tokens/s
    aggregate       C requests at once (C = 1, 8, 32): C x new tokens / wall time
                    ours: C concurrent requests submitted to the engine (continuous batching)
                    transformers: one model.generate() over a batch of C equal-length prompts
                    fastchat 0.2.36: generate_stream, one request at a time (its worker serves a
                    batch of one), so its aggregate equals its single-stream rate

    python bench/bench_chat.py                    # on a GPU machine: 7B shape, 128-token prompt, 256 new tokens
    python bench/bench_chat.py --size 13b --concurrency 1 --new-tokens 256    # the 13B "256 tokens < 3 s" goal
    python bench/bench_chat.py --tiny             # CPU smoke test of the script itself

The tokenizer is synthetic (32000 pieces, LLaMA's decoder pipeline) so detokenisation costs what it
would with LLaMA's. Results go to bench/results/chat.json (or --output) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few tokens")
    parser.add_argument("--size", default="7b", help="model shape from vicunaflow.sizes (7b, 13b, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--context", type=int, default=2048, help="KV cache length per request")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    parser.add_argument(
        "--only", nargs="+", choices=["ours", "transformers", "fastchat"], default=["ours", "transformers", "fastchat"]
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="ours: plain eager decode steps")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "chat.json")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.device, args.concurrency = "tiny", "cpu", [1, 4]
        args.prompt_tokens, args.new_tokens, args.context, args.repeats = 32, 32, 256, 1

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = make_model(args.size, args.device, dtype, args.context)
    tokenizer = make_tokenizer(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(300, model.config.vocab_size, (args.prompt_tokens - 1,), generator=generator).tolist()]
        for _ in range(max(args.concurrency))
    ]
    info = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cuda_graphs": args.device == "cuda" and not args.no_cuda_graphs,
    }
    print(json.dumps(info))
    results = []
    if "ours" in args.only:
        results += bench_ours(model, tokenizer, prompts, args)
    if "transformers" in args.only:
        results += bench_transformers(model, prompts, args)
    if "fastchat" in args.only:
        results += bench_fastchat(model, tokenizer, prompts, args)
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    print(f"wrote {args.output}")


def make_model(size_name: str, device: str, dtype: torch.dtype, context: int):
    """A random LlamaForCausalLM of a known size, built directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicunaflow.formats import ffn_hidden_dim
    from vicunaflow.sizes import get_size

    size = get_size(size_name)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=size.dim,
        intermediate_size=ffn_hidden_dim(size.dim, size.multiple_of),
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_heads,
        max_position_embeddings=max(context, 2048),
        rms_norm_eps=size.norm_eps,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a float32 7B would need twice the memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def make_tokenizer(vocab_size: int):
    """A 32000-piece tokenizer with LLaMA's decoder (▁ -> space, byte fallback), for realistic decode cost."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {("▁" if i % 3 == 0 else "") + f"w{i}": i for i in range(len(vocab), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ours(model, tokenizer, prompts, args) -> list[dict]:
    from vicunaflow.generate import Engine, SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    results = []
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=max(args.concurrency),
        max_context=args.context,
        cuda_graphs=not args.no_cuda_graphs,
    )
    with engine:
        list(engine.generate(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=8)))  # warm-up
        best = None
        for _ in range(args.repeats):
            times = []
            start = time.perf_counter()
            for event in engine.generate(prompts[0], params):
                times.append(time.perf_counter())
                tokens = event.completion_tokens
            decode_rate = (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
            run = {
                "first_token_s": times[0] - start,
                "decode_tok_s": decode_rate,
                "e2e_tok_s": tokens / (times[-1] - start),
            }
            best = run if best is None or run["decode_tok_s"] > best["decode_tok_s"] else best
        results.append({"engine": "vicunaflow", "mode": "single-stream", "concurrency": 1, **best})
        for concurrency in args.concurrency:
            best_rate, tokens = 0.0, 0
            for _ in range(args.repeats):
                counts = [0] * concurrency
                done = threading.Semaphore(0)

                def sink(event, i, counts=counts, done=done):
                    counts[i] = event.completion_tokens
                    if event.finish_reason is not None:
                        done.release()

                start = time.perf_counter()
                for i in range(concurrency):
                    engine.submit(prompts[i], params, lambda event, i=i, sink=sink: sink(event, i))
                for _ in range(concurrency):
                    done.acquire()
                elapsed = time.perf_counter() - start
                tokens = sum(counts)
                best_rate = max(best_rate, tokens / elapsed)
            stats = engine.snapshot_stats()
            results.append(
                {
                    "engine": "vicunaflow",
                    "mode": "aggregate",
                    "concurrency": concurrency,
                    "tokens": tokens,
                    "aggregate_tok_s": best_rate,
                    "max_batch": stats["max_batch"],
                }
            )
    return results


@torch.inference_mode()
def bench_transformers(model, prompts, args) -> list[dict]:
    results = []
    device = args.device
    model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False)  # warm-up
    for concurrency in args.concurrency:
        batch = torch.tensor(prompts[:concurrency], device=device)  # equal lengths: no padding needed
        best = 0.0
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            out = model.generate(
                batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            sync(device)
            elapsed = time.perf_counter() - start
            best = max(best, concurrency * (out.shape[1] - batch.shape[1]) / elapsed)
        mode = "single-stream" if concurrency == 1 else "aggregate"
        row = {"engine": "transformers.generate", "mode": mode, "concurrency": concurrency, "aggregate_tok_s": best}
        if concurrency == 1:
            row["e2e_tok_s"] = best
        results.append(row)
    return results


def bench_fastchat(model, tokenizer, prompts, args) -> list[dict]:
    """FastChat 0.2.36's generate_stream (its model worker's loop), one request at a time."""
    try:
        from fastchat.serve.inference import generate_stream
    except ImportError as err:
        print(f"fastchat: skipped ({err}); pip install fschat==0.2.36")
        return []
    prompt = tokenizer.decode(prompts[0][1:])
    params = {
        "prompt": prompt,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": args.new_tokens,
        "echo": False,
        "stop_token_ids": [],
    }
    eos = tokenizer.eos_token_id
    tokenizer.eos_token_id = None  # generate_stream stops at EOS; never let the random model end early
    try:
        best = None
        for _ in range(args.repeats + 1):  # the first run warms up
            start = time.perf_counter()
            first = None
            output = None
            for output in generate_stream(model, tokenizer, params, args.device, args.context, stream_interval=1):  # noqa: B007
                first = first or time.perf_counter()
            elapsed = time.perf_counter() - start
            tokens = output["usage"]["completion_tokens"]
            run = {
                "e2e_tok_s": tokens / elapsed,
                "decode_tok_s": (tokens - 1) / (time.perf_counter() - first),
                "tokens": tokens,
            }
            best = run if best is None or run["e2e_tok_s"] > best["e2e_tok_s"] else best
    except Exception as err:  # FastChat targets transformers 4.x; report rather than abort the other results
        print(f"fastchat: failed with transformers {info_version()}: {type(err).__name__}: {err}")
        return []
    finally:
        tokenizer.eos_token_id = eos
    return [{"engine": "fastchat.generate_stream", "mode": "single-stream", "concurrency": 1, **best}]


def info_version() -> str:
    return __import__("transformers").__version__


def print_table(results: list[dict]) -> None:
    columns = [
        "engine",
        "mode",
        "concurrency",
        "decode_tok_s",
        "e2e_tok_s",
        "aggregate_tok_s",
        "first_token_s",
        "max_batch",
    ]
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in results:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:>14.1f}" if isinstance(value, float) else f"{value!s:>14}")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
