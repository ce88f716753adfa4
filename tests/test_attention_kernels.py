"""The paged decode-attention kernel, against torch SDPA on the gathered keys and values (Triton's
interpreter where there is no GPU)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first built

from vicunaflow import attention_kernels, kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter (3.6) narrows to float8 wrongly (1.98 -> 1.0, 500 -> 256): kernels storing into a float8
# cache are checked on a GPU, where the conversion is one cvt instruction; reading one is checked here too
FLOAT8_STORES = "stores into a float8 cache: on a GPU only (Triton's interpreter narrows to float8 wrongly)"
pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs Triton")


def _reference(query, keys, values, tables, lengths) -> torch.Tensor:
    """SDPA in float64 of each row over its gathered blocks' first `length` positions: [B, H, D]."""
    B, H, D = query.shape
    _, Hkv, block_size, _ = keys.shape
    rows = []
    for b in range(B):
        length = int(lengths[b])
        blocks = tables[b, : -(-length // block_size)].long()
        k = keys[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :length].double()  # [Hkv, L, D]
        v = values[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :length].double()
        q = query[b].double()[:, None]  # [H, 1, D]
        rows.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H)[:, 0])
    return torch.stack(rows)


def test_a_step_takes_its_tiles_by_its_rows_and_grouping():
    """Which tiles a step takes: 33-64 rows MIDDLE_ROWS_TILES, more or fewer MANY_ROWS_TILES, few rows by their
    grouping."""
    many = attention_kernels.MANY_ROWS
    assert attention_kernels.tiles_for(many, 1) is attention_kernels.MANY_ROWS_TILES
    assert attention_kernels.tiles_for(32, 1) is attention_kernels.MANY_ROWS_TILES
    assert (
        attention_kernels.tiles_for(33, 1) is attention_kernels.tiles_for(64, 4) is attention_kernels.MIDDLE_ROWS_TILES
    )
    assert attention_kernels.tiles_for(65, 1) is attention_kernels.MANY_ROWS_TILES
    assert attention_kernels.tiles_for(256, 4) is attention_kernels.MANY_ROWS_TILES
    assert attention_kernels.tiles_for(many - 1, 1) is attention_kernels.FEW_ROWS
    assert attention_kernels.tiles_for(many - 1, 4) is attention_kernels.FEW_ROWS_GROUPED
    for name in attention_kernels.TILE_CLASSES:  # a split is whole tiles: none reads its neighbour's positions
        tiles = getattr(attention_kernels, name)
        assert tiles.split_tokens % tiles.tile == 0, name


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "dtype", "cache_dtype"),
    [
        (4, 4, 32, 16, torch.float32, None),  # multi-head, float32: exact products (no TF32)
        (8, 2, 32, 16, torch.float16, None),  # grouped-query: 4 query heads per KV head
        (4, 1, 64, 32, torch.bfloat16, None),
        (3, 3, 40, 16, torch.float16, None),  # head_dim not a power of two: masked
        (4, 4, 32, 16, torch.float16, torch.float8_e4m3fn),  # --kv-cache-dtype fp8: widened to the query's dtype
        (8, 2, 32, 16, torch.float32, torch.float8_e4m3fn),
    ],
)
@pytest.mark.parametrize("many_rows", ["few", "middle", "many"], ids=["few-rows", "middle-rows", "many-rows"])
@pytest.mark.parametrize("multi_head", ["tensor-cores", "cuda-cores"])
def test_paged_decode_attention_matches_sdpa(
    heads, kv_heads, head_dim, block_size, dtype, cache_dtype, many_rows, multi_head, monkeypatch
):
    if many_rows == "middle" and multi_head == "cuda-cores":
        pytest.skip("MIDDLE_ROWS_TILES differ from MANY_ROWS_TILES in tile and warps only: tensor cores suffice")
    if many_rows != "few":  # the splits a step of many rows takes: MANY_ROWS_TILES, or MIDDLE_ROWS_TILES
        monkeypatch.setattr(attention_kernels, "MANY_ROWS", 1)
        monkeypatch.setattr(attention_kernels, "MIDDLE_ROWS", range(1, 65) if many_rows == "middle" else range(0))
    for name in attention_kernels.TILE_CLASSES:  # grouped-query layers take tl.dot either way
        tiles = getattr(attention_kernels, name)
        monkeypatch.setattr(attention_kernels, name, dataclasses.replace(tiles, multi_head=multi_head))
    generator = torch.Generator().manual_seed(heads * head_dim + block_size)
    width, blocks = 600 // block_size + 1, 64  # a 600-position context: several splits, the last one partial
    # splits' edges for few rows (64) and many (512); the last row in the grid's last block
    lengths = torch.tensor([1, 17, 256, 257, 512, 513, width * block_size - 3][: 7 if block_size == 16 else 6])
    B = len(lengths)
    keys = torch.randn(blocks, kv_heads, block_size, head_dim, generator=generator).to(DEVICE, cache_dtype or dtype)
    values = torch.randn(blocks, kv_heads, block_size, head_dim, generator=generator).to(DEVICE, cache_dtype or dtype)
    # the query heads of q|k|v [B, H + 2 Hkv, D] and tables in columns 2.. of the step's inputs, as the model passes them
    qkv = torch.randn(B, heads + 2 * kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    query = qkv[:, :heads]
    # each row's blocks anywhere in the pool (block 0 is the engine's scratch block: never a row's)
    tables = torch.stack([torch.randperm(blocks - 1, generator=generator)[:width] + 1 for _ in range(B)])
    tables = torch.cat([torch.zeros(B, 2, dtype=torch.long), tables], dim=1).to(DEVICE)[:, 2:]
    ours = attention_kernels.paged_decode_attention(query, keys, values, tables, lengths.to(DEVICE))
    expected = _reference(query.cpu(), keys.cpu(), values.cpu(), tables.cpu(), lengths)
    assert ours.shape == query.shape and ours.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(ours.cpu().double(), expected, atol=tolerance, rtol=tolerance), (
        (ours.cpu().double() - expected).abs().max()
    )


@pytest.mark.skipif(
    DEVICE != "cuda", reason="the loop to a row's length is compiled only: Triton's interpreter walks whole splits"
)
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (16, 4)])
def test_walking_only_a_rows_tiles_gives_the_bits_of_walking_whole_splits(heads, kv_heads, monkeypatch):
    """A program stops at its row's last tile (ATTENTION_LOOP "length"); the masked tiles it skips added nothing:
    the same bits, multi-head and grouped-query, at the splits' edges; any other ATTENTION_LOOP is refused."""
    monkeypatch.setattr(attention_kernels, "MANY_ROWS", 1)
    generator = torch.Generator().manual_seed(heads)
    head_dim, block_size, width = 128, 16, 128  # a 2,048-position grid: splits past most rows' ends
    lengths = torch.tensor([1, 63, 64, 65, 511, 512, 513, 1024, 2047, 2048])
    rows, blocks = len(lengths), len(lengths) * width + 1
    keys = torch.randn(blocks, kv_heads, block_size, head_dim, generator=generator).to(DEVICE, torch.float16)
    values = torch.randn(blocks, kv_heads, block_size, head_dim, generator=generator).to(DEVICE, torch.float16)
    query = torch.randn(rows, heads, head_dim, generator=generator).to(DEVICE, torch.float16)
    tables = (torch.randperm(blocks - 1, generator=generator)[: rows * width] + 1).view(rows, width).to(DEVICE)
    outputs = []
    for loop in ("length", "split"):
        monkeypatch.setattr(attention_kernels, "ATTENTION_LOOP", loop)
        outputs.append(attention_kernels.paged_decode_attention(query, keys, values, tables, lengths.to(DEVICE)))
    assert torch.equal(outputs[0], outputs[1])
    monkeypatch.setattr(attention_kernels, "ATTENTION_LOOP", "lenght")
    with pytest.raises(ValueError, match="VICUNAFLOW_ATTENTION_LOOP='lenght'"):
        attention_kernels.paged_decode_attention(query, keys, values, tables, lengths.to(DEVICE))
    expected = _reference(query.cpu().float(), keys.cpu().float(), values.cpu().float(), tables.cpu(), lengths)
    assert torch.allclose(outputs[0].cpu().double(), expected, atol=2e-2, rtol=2e-2)


def test_paged_decode_attention_refuses_a_split_of_part_of_a_tile(monkeypatch):
    few = attention_kernels.FEW_ROWS
    monkeypatch.setattr(attention_kernels, "FEW_ROWS", dataclasses.replace(few, split_tokens=few.tile // 2))
    keys = torch.zeros(8, 4, 16, 32)
    with pytest.raises(ValueError, match="not a multiple of a tile"):
        attention_kernels.paged_decode_attention(
            torch.zeros(2, 4, 32), keys, keys, torch.zeros(2, 4, dtype=torch.int32), torch.ones(2)
        )


def test_rope_in_the_attention_kernel_refuses_mixed_prefill_and_unknown_settings(tiny_vicuna, monkeypatch):
    """ROPE "attention" stores a row's new key inside the kernel: rows sharing a table (mixed prefill) could read
    it half-written, so the engine refuses the pair; a mistyped VICUNAFLOW_ROPE is named."""
    from vicunaflow import VicunaflowError
    from vicunaflow.engine import Engine, load_model

    model, tokenizer = load_model(tiny_vicuna)
    monkeypatch.setattr(attention_kernels, "ROPE", "attention")
    with pytest.raises(VicunaflowError, match="unset VICUNAFLOW_ROPE"):
        Engine(model, tokenizer, max_batch_size=2, mixed_prefill=1)
    monkeypatch.setattr(attention_kernels, "ROPE", "inside")
    qkv = torch.zeros(1, 3 * 16)
    with pytest.raises(ValueError, match="VICUNAFLOW_ROPE='inside'"):
        attention_kernels.decode_attention(qkv, *[torch.zeros(1, 8)] * 2, *[torch.zeros(1, dtype=torch.long)] * 2,
                                           torch.zeros(1, 1, dtype=torch.long), *[torch.zeros(2, 1, 16, 16)] * 2, 1,
                                           torch.zeros(1, dtype=torch.int32))  # fmt: skip


def test_paged_decode_attention_refuses_mismatched_shapes():
    query = torch.zeros(2, 6, 32)
    keys = torch.zeros(8, 4, 16, 32)  # 6 query heads do not group over 4 KV heads
    with pytest.raises(ValueError, match="do not fit"):
        attention_kernels.paged_decode_attention(query, keys, keys, torch.zeros(2, 4, dtype=torch.int32), torch.ones(2))


@pytest.mark.parametrize("rope", ["product", "separate", "attention"])
@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
def test_engine_decodes_through_the_kernel(fixture, rope, request, monkeypatch):
    """The engine's decode steps through the kernel (forced on here; on by default on CUDA) reply what
    gathered keys and values through SDPA reply, batched, rows of different lengths; with the rotary and the
    new key's store in q|k|v's epilogue (ROPE "product", with the decode products through kernels.matvec and
    matmul_rows as on CUDA), in rope_store's kernel or in the attention kernel."""
    import threading

    from vicunaflow.engine import Engine, SamplingParams, load_model

    # float32 on a GPU too: the two paths round differently in half precision, and greedy ties could flip
    monkeypatch.setattr(attention_kernels, "ROPE", rope)
    model, tokenizer = load_model(request.getfixturevalue(fixture), device=DEVICE, dtype="float32")
    prompts = [[1, 450, 748, 310], [1, *range(300, 380)], [1, 221, 292]]  # the second row spans two splits
    # two decode steps of three rows: each launch is 3 x KV heads x 2 splits programs, ~50 ms each interpreted
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    calls = []
    kernel = attention_kernels.decode_attention
    monkeypatch.setattr(attention_kernels, "decode_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))

    def replies(use_kernel: bool) -> list[list[int]]:
        done = threading.Semaphore(0)
        # a 128-position context: the interpreter runs every program of the grid (rows x KV heads x splits)
        with Engine(model, tokenizer, max_batch_size=3, max_context=128, cuda_graphs=False, warm_up=False) as engine:
            model.attention_kernel = use_kernel
            model.matvec = use_kernel and rope == "product"
            requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
            for _ in prompts:
                done.acquire()
        return [r.decoder.ids for r in requests]

    expected = replies(False)
    assert not calls
    assert replies(True) == expected and calls
    # the three-row steps' keys were stored by q|k|v's epilogue with ROPE "product" (one-row steps: rope_store),
    # where a tile fits in a head (not the tiny models' 32 dims on a GPU, whose tiles are 64 or 128 wide)
    in_product = rope == "product" and kernels.rope_fits(model.args.head_dim)
    assert any(kw.get("stored") for kw in calls) == in_product


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "dtype"),
    [
        (4, 4, 16, torch.float32),
        (8, 2, 32, torch.float16),
        (3, 3, 40, torch.float32),  # head_dim not a power of two (as the attention kernel allows): masked
    ],
)
@pytest.mark.parametrize("prompt", [False, True], ids=["decode-rows", "one-prompt"])
def test_rope_store_rotates_in_place_and_stores_into_blocks(heads, kv_heads, head_dim, dtype, prompt):
    """q rotated inside q|k|v, k rotated and v copied into each row's block at its position, as the
    model's own rotary (apply_rope) and cache write would; k and v in q|k|v untouched, or (a prompt's
    tokens sharing one block table, as a prefill stores them) k rotated in place too."""
    from vicunaflow.engine.model import apply_rope

    generator = torch.Generator().manual_seed(heads + head_dim)
    rows, blocks, block_size = 3, 16, 4
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    positions = torch.tensor([0, 5, 13], device=DEVICE)
    # distinct blocks (none the scratch block 0): no two positions share a slot
    tables = (1 + torch.randperm(blocks - 1, generator=generator)[: rows * 4]).view(rows, 4).to(DEVICE)
    keys = torch.zeros(blocks, kv_heads, block_size, head_dim, dtype=dtype, device=DEVICE)
    values = torch.zeros_like(keys)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq  # [rows, head_dim / 2]
    out = qkv.clone()
    strided = torch.stack([positions, positions * 0], dim=1)[:, 0]  # the runner's positions: a column of its inputs
    if prompt:  # the three rows are one prompt's tokens: its table serves them all
        tables = tables[:1]
    attention_kernels.rope_store(
        out, angles.cos(), angles.sin(), strided, tables, keys, values, heads,
        tokens_per_table=rows if prompt else 1, keys_in_place=prompt,
    )  # fmt: skip

    emb = torch.cat([angles, angles], dim=-1)[:, None, None]  # [rows, 1, 1, head_dim]
    q_and_k = qkv[:, : (heads + kv_heads) * head_dim].double().view(rows, 1, heads + kv_heads, head_dim)
    rotated = apply_rope(q_and_k, (emb.cos().double(), emb.sin().double()))[:, 0]  # [rows, heads + kv, D]
    tolerance = 2**-9 if dtype == torch.float16 else 1e-5
    got_q = out[:, : heads * head_dim].double().view(rows, heads, head_dim)
    assert torch.allclose(got_q, rotated[:, :heads], rtol=tolerance, atol=tolerance)
    assert torch.equal(out[:, (heads + kv_heads) * head_dim :], qkv[:, (heads + kv_heads) * head_dim :])
    got_k = out[:, heads * head_dim : (heads + kv_heads) * head_dim]
    if prompt:
        got_k = got_k.double().view(rows, kv_heads, head_dim)
        assert torch.allclose(got_k, rotated[:, heads:], rtol=tolerance, atol=tolerance)
    else:
        assert torch.equal(got_k, qkv[:, heads * head_dim : (heads + kv_heads) * head_dim])
    for row in range(rows):
        position = int(positions[row])
        block = int(tables[0 if prompt else row, position // block_size])
        stored_k = keys[block, :, position % block_size].double()
        assert torch.allclose(stored_k, rotated[row, heads:], rtol=tolerance, atol=tolerance)
        assert torch.equal(
            values[block, :, position % block_size], qkv[row, (heads + kv_heads) * head_dim :].view(kv_heads, head_dim)
        )


@pytest.mark.parametrize(("mode", "rope"), [("fused", "separate"), ("split", "separate"), ("fused", "attention")])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "dtype", "many_rows", "cache_dtype"),
    [
        (4, 4, 32, torch.float32, False, None),
        (8, 2, 32, torch.float16, False, None),  # grouped-query: the newest key stored once per KV head
        (8, 2, 32, torch.float16, True, None),
        (3, 3, 40, torch.float32, False, None),  # head_dim not a power of two: masked
        (4, 4, 32, torch.float16, True, torch.float8_e4m3fn),  # --kv-cache-dtype fp8: stored rounded, read widened
        (8, 2, 32, torch.float32, False, torch.float8_e4m3fn),
    ],
)
def test_decode_attention_rotates_stores_and_attends(
    heads, kv_heads, head_dim, dtype, many_rows, cache_dtype, mode, rope, monkeypatch
):
    """decode_attention (one kernel with ATTENTION "fused") = the model's own rotary, the newest key and value
    stored in each row's block, then SDPA over the row's positions; its counters are left at zero, so a
    second layer's launch on the same counters (the engine's) is right too. ROPE "attention": the rotary and
    the store inside the split kernel, with the same result. A float8 cache holds the key and value rounded to
    it, and the attention is SDPA over what the cache holds."""
    from vicunaflow.engine.model import apply_rope

    if cache_dtype is not None and DEVICE == "cpu":
        pytest.skip(FLOAT8_STORES)
    monkeypatch.setattr(attention_kernels, "ATTENTION", mode)
    monkeypatch.setattr(attention_kernels, "ROPE", rope)
    if many_rows:
        monkeypatch.setattr(attention_kernels, "MANY_ROWS", 1)
    generator = torch.Generator().manual_seed(heads * head_dim + many_rows)
    block_size, width = 16, 40  # a 640-position context: a many-row step's splits of 512 too
    # splits' edges (few rows: 64, many: 512): the newest position opens one, ends one
    positions = torch.tensor([0, 16, 63, 64, 200, 319, 511, 512, 639])
    B = len(positions)
    blocks = B * width + 5
    qkv = torch.randn(B, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    # blocks anywhere in the pool, each row's its own, as the cache gives them (a row's new key is in no other row)
    tables = (torch.randperm(blocks - 1, generator=generator)[: B * width] + 1).view(B, width).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq  # [B, head_dim / 2]
    emb = torch.cat([angles, angles], dim=-1)[:, None, None].double()  # [B, 1, 1, head_dim]
    rotated = apply_rope(
        qkv[:, : (heads + kv_heads) * head_dim].cpu().double().view(B, 1, heads + kv_heads, head_dim),
        (emb.cos(), emb.sin()),
    )[:, 0]  # [B, heads + kv_heads, head_dim]
    counters = torch.zeros(B * kv_heads + 3, dtype=torch.int32, device=DEVICE)
    for _layer in range(2):  # two layers' launches on the same counters
        keys = torch.randn(blocks, kv_heads, block_size, head_dim, generator=generator).to(DEVICE, cache_dtype or dtype)
        values = torch.randn(blocks, kv_heads, block_size, head_dim, generator=generator).to(
            DEVICE, cache_dtype or dtype
        )
        out = attention_kernels.decode_attention(
            qkv.clone(), angles.cos().to(DEVICE), angles.sin().to(DEVICE), positions.to(DEVICE),
            (positions + 1).to(DEVICE), tables, keys, values, heads, counters,
        )  # fmt: skip
        assert out.shape == (B, heads * head_dim) and out.dtype == dtype
        assert not counters.any(), "counters not left at zero"
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        stored_keys, stored_values = keys.cpu().double(), values.cpu().double()
        # float8 e4m3 keeps 3 mantissa bits: within 2^-4 relative, 2^-10 absolute below its normals
        stored_rtol, stored_atol = (tolerance, tolerance) if cache_dtype is None else (2**-3, 2**-9)
        for row in range(B):
            position = int(positions[row])
            block = int(tables[row, position // block_size])
            key = stored_keys[block, :, position % block_size]
            assert torch.allclose(key, rotated[row, heads:], rtol=stored_rtol, atol=stored_atol)
            value = qkv[row, (heads + kv_heads) * head_dim :].cpu().view(kv_heads, head_dim).double()
            stored_value = stored_values[block, :, position % block_size]
            if cache_dtype is None:
                assert torch.equal(stored_value, value)
            else:
                assert torch.allclose(stored_value, value, rtol=2**-3, atol=2**-9)
        query = rotated[:, :heads].to(dtype).double()  # as the kernels round it
        expected = _reference(query, stored_keys, stored_values, tables.cpu(), positions + 1)
        got = out.cpu().double().view(B, heads, head_dim)
        assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance), (got - expected).abs().max()
