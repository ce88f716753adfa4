"""The autotuner every Triton kernel of ours goes through. Importing this module does not need Triton."""

from __future__ import annotations


def autotune(configs: list, key: list[str], **options):
    """triton.autotune that keeps its choice for each shape on disk, in Triton's cache beside the compiled kernels.

    Why: tiles that split K differently sum a row's products in another order, so the tile the timing picks
    decides a float16 result's last bits, and on near-tied logits a greedy reply. Timed afresh in each process,
    a server's two engine processes of one 7B folder picked other tiles for its one-row q|k|v product on an H200
    and answered 0 of 8 requests sent alone with the same greedy reply; with the choices kept, 8 of 8
    (docs/benchmarks.md, twenty-sixth session). Kept, the first process to tune a shape decides for every later
    one sharing the cache (TRITON_CACHE_DIR, default ~/.triton/cache; a server's engines warm up in turn), and
    a restarted server answers as before. A cleared cache tunes again."""
    import triton

    return triton.autotune(configs=configs, key=key, cache_results=True, **options)
