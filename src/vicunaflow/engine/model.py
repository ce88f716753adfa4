"""The LLaMA inference model: one forward for prefill and decode, over a KV cache it owns.

    Transformer -> Block (attention, feed-forward) -> project() (float weights, or quant.QuantWeight int8/int4)

Shaped after gpt-fast's model.py: q|k|v are one weight `wqkv` and gate|up one `w13`, fused when the
weights load (engine/load.py); the forward takes each token's position, so a prompt of T tokens and a
decode step of one token per row run the same code. With tensor parallelism (engine/tp.py) a rank
holds its own output rows of wqkv and w13 (whole heads) and its own input columns of wo and w2, and
its `comm` adds the ranks' partial sums after those two products (two all-reduces a layer).

Why not the Hugging Face module: its decode step launches ~50 kernels a layer (RMSNorm in six
pieces, rotary in ten); inside a CUDA graph each still costs ~1.75 µs, which capped a 7B at ~140
tokens/s. Here a one-row decode layer on CUDA is 6 kernels: q|k|v product (RMSNorm folded in), rotary of q
and k with the K/V store into the row's block, the paged attention combining its own splits (the two of
attention_kernels.decode_attention), o product adding into the residual, gate|up product (RMSNorm folded
in), down product that applies SiLU·up to its input and adds the residual (the products are Triton
kernels for one-row steps, `kernels.matvec`). A batched step (2-64 rows, `kernels.matmul_rows`) rotates q and k
and stores the new keys and values in q|k|v's epilogue (`rope_in_product`), and up to 32 rows on one rank takes
each RMSNorm's input from the epilogue of the product before it (`norms_in_epilogues`).
Without the attention kernel, rotary is one batched matmul by each row's rotation matrix, then the
stores and SDPA.

The KV cache is paged (engine/cache.py): each row's keys and values sit in blocks named by its block
table, which every forward receives as a device tensor. A decode step on CUDA attends through the
tables in place (attention_kernels.decode_attention); prompts, and decode steps elsewhere, gather the
rows' blocks and use SDPA.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vicunaflow import VicunaflowError, attention_kernels, kernels
from vicunaflow.engine.cache import KVCache
from vicunaflow.quant import Int4Columns, Int4Packed, QuantWeight, qlinear


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The shape of a LLaMA, read from a Hugging Face config.json (`from_hf`)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention (LLaMA-2 70B); LLaMA-1 and Vicuna: = n_heads
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, config: dict, source: object = "config.json") -> ModelArgs:
        """The shape of a Hugging Face LLaMA config; a config we cannot run is refused naming `source` (its file)."""
        unsupported = {
            "hidden_act": (config.get("hidden_act", "silu"), "silu"),
            "attention_bias": (bool(config.get("attention_bias", False)), False),
            "mlp_bias": (bool(config.get("mlp_bias", False)), False),
            "rope_scaling": (config.get("rope_scaling"), None),
        }
        for key, (value, wanted) in unsupported.items():
            if value != wanted:
                raise VicunaflowError(f"{source}: {key}={value!r} is not supported (LLaMA has {wanted!r})")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VicunaflowError(f"{source}: {key} is {value!r}; a LLaMA's config needs a positive integer")
        heads = config["num_attention_heads"]
        if config.get("head_dim") not in (None, config["hidden_size"] // heads):
            raise VicunaflowError(f"{source}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            ffn_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", 10000.0),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


# SDPA backends for prompts (and decode without the paged kernel): not cuDNN's, which builds an execution
# plan for every new shape on first use. Served through the API on an H200, a prompt length not seen before
# took 116 ms to its first token at the median and up to 1.4 s, against 33 ms for a repeated length.
PROMPT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# A layer's Linear weight: float [N, K], or int8/int4 codes with their scales (docs/quantize.md)
Weight = torch.Tensor | QuantWeight | Int4Packed | Int4Columns
QUANTIZED = (QuantWeight, Int4Packed, Int4Columns)


def project(
    x: torch.Tensor,
    weight: Weight,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    *,
    out: torch.Tensor | None = None,
    matvec: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,
    gated: bool = False,
    rope: kernels.RopeStore | None = None,
    norm_out: tuple[torch.Tensor, kernels.Normed] | None = None,
    normed: kernels.Normed | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ residual); with swiglu, x is gate|up [M, 2K] and the input is silu(gate) * up.

    x: [M, K]; returns [M, N] (written into `out` when given, which may be float32). matvec: products
    through the Triton kernels (CUDA, float16/bfloat16): kernels.matvec for one row, kernels.matmul_rows
    for 2..FLOAT_ROWS_MAX rows (batched decode steps, short prefill chunks) unless kernels.FLOAT_ROWS is
    "cublas".
    norm: (RMSNorm weight [K], eps) to apply to x first (inside the kernels: one launch fewer). weight:
    a float tensor, or a quant.QuantWeight (int8/int4): its own Triton kernels with the same epilogues,
    else decoded to x's dtype and multiplied, a quant.Int4Packed (torch's tinygemm for every row count,
    in bfloat16) or a quant.Int4Columns (qmatvec_columns for one row). Prefill (more rows, or matvec off)
    stays on cuBLAS.
    gated: weight is gate|up [2F, K] and the result silu(gate) * up [M, F], from the product's epilogue; only
    where the product goes through kernels.matmul_rows (`takes_matmul_rows`), else refused.
    rope: weight is q|k|v and the epilogue rotates q and k and stores the new keys and values; norm_out, normed: the
    next RMSNorm's input left by this product's epilogue, or taken as x (kernels.matmul_rows says how); each refused
    where `gated` would be.
    """
    epilogue = {"SiLU·up": gated, "the rotary": rope is not None, "norm_out": norm_out is not None}
    epilogue |= {"normed": normed is not None}
    if any(epilogue.values()) and not takes_matmul_rows(x.shape[0], weight, matvec):
        raise ValueError(
            f"project: {', '.join(name for name, on in epilogue.items() if on)} in the product's epilogue is for "
            f"batched decode steps, not {x.shape[0]} rows"
        )
    if matvec and x.shape[0] == 1:
        norm_weight, eps = norm if norm is not None else (None, 1e-6)
        if isinstance(weight, QUANTIZED):
            if out is None and norm is not None and isinstance(weight, (QuantWeight, Int4Columns)):
                # x may be the float32 residual stream: give the model's dtype (Int4Packed returns bfloat16)
                out = torch.empty(1, weight.shape[0], dtype=norm_weight.dtype, device=x.device)
            return qlinear(x.contiguous(), weight, residual, swiglu, out=out, matvec=True, norm=norm_weight, eps=eps)
        return kernels.matvec(x.contiguous(), weight, residual, swiglu, out=out, norm=norm_weight, eps=eps)
    if isinstance(weight, QUANTIZED):
        # several rows: quant_kernels.qmatmul (RMSNorm folded in) where the decode kernels are on, else decoded
        norm_weight, eps = norm if norm is not None else (None, 1e-6)
        return qlinear(
            x, weight, residual, swiglu, out=out, matvec=None if matvec else False, norm=norm_weight, eps=eps
        )
    if takes_matmul_rows(x.shape[0], weight, matvec):
        # a batched decode step: one kernel reads the weight once for every row, RMSNorm and the residual folded in
        norm_weight, eps = norm if norm is not None else (None, 1e-6)
        return kernels.matmul_rows(
            x if normed is not None else x.contiguous(), weight, residual, swiglu, out=out, norm=norm_weight, eps=eps,
            gated=gated, rope=rope, norm_out=norm_out, normed=normed,
        )  # fmt: skip
    norm_weight, eps = norm if norm is not None else (None, 1e-6)
    if swiglu and matvec and x.is_cuda and kernels.FLOAT_ROWS == "triton":
        # SiLU·up in one launch, as matmul_rows takes it: torch's two kernels and the [M, K] tensor between them
        # took 22 µs a 7B layer in a 256-row step on an H200, this 8 (bench_chat's step profile, seventeenth session)
        x = kernels.rows_input(x.contiguous(), norm=norm_weight, eps=eps, swiglu=True, dtype=x.dtype)
    else:
        x = kernels.plain_input(x, norm=norm_weight, eps=eps, swiglu=swiglu)
    y = F.linear(x, weight) if residual is None else torch.addmm(residual, x, weight.t())
    if out is not None:
        return out.copy_(y)
    return y


def takes_matmul_rows(rows: int, weight: Weight, matvec: bool) -> bool:
    """Whether project multiplies through kernels.matmul_rows: a batched decode step (2..FLOAT_ROWS_MAX rows) on
    float weights, with the decode kernels on. There the MLP's SiLU·up comes from gate|up's epilogue (gated); one
    row keeps it in the down matvec's input (free there), and prefill, cuBLAS steps and quantized weights compute
    it in a launch of its own."""
    return (
        matvec
        and 1 < rows <= kernels.FLOAT_ROWS_MAX
        and kernels.FLOAT_ROWS == "triton"
        and not isinstance(weight, QUANTIZED)
    )


# "epilogue": in batched decode steps of up to NORMS_EPILOGUE_ROWS rows on one rank, each RMSNorm's input comes from
# the epilogue of the product adding into the residual stream before it (kernels.Normed), and the product after it
# scales its rows by their RMSNorm factors (norms_in_epilogues); "separate": a rows_input launch normalises each
# product's input first (or, under kernels.NORM_FIRST_ROWS rows, the product folds it in). On an H200 (7B, through
# the API, twenty-ninth session) 64-row steps took 6.75 ms of GPU time with the epilogues against 6.58 apart, their
# consumers then reading the rows' squares after the K loop; read before it (thirty-first session), 64-row steps
# replayed 1.5% and 0.6% faster with the epilogues on two H200s and 1.0% slower on a third, so 33-64 rows keep
# rows_input's launches
NORMS = os.environ.get("VICUNAFLOW_NORMS", "epilogue")
NORMS_EPILOGUE_ROWS = 32


@dataclasses.dataclass
class EpilogueNorms:
    """What a decode step's layers hand on when their RMSNorms come from the products' epilogues: this layer's
    attention-norm input, left by the last layer's down product (None in the first layer: RMSNorm as usual)."""

    attention: kernels.Normed | None = None


def norms_in_epilogues(model: Transformer, rows: int) -> bool:
    """Whether a decode step of `rows` rows takes its RMSNorms from the products' epilogues (NORMS): up to
    NORMS_EPILOGUE_ROWS rows, one rank (no all-reduce after o and down), every product through kernels.matmul_rows,
    and q|k|v with the rotary in its epilogue (`rope_in_product`: our kernel, not cuBLAS, takes the normed rows)."""
    if NORMS not in ("epilogue", "separate"):
        raise VicunaflowError(f"VICUNAFLOW_NORMS={NORMS!r}: choose epilogue or separate")
    layer = model.layers[0]
    return (
        NORMS == "epilogue"
        and rows <= NORMS_EPILOGUE_ROWS
        and model.comm.world == 1
        and model.args.dim % kernels.NORM_GROUP == 0
        and all(takes_matmul_rows(rows, w, model.matvec) for w in (layer.wqkv, layer.wo, layer.w13, layer.w2))
        and rope_in_product(rows, layer.wqkv, model.matvec, model.args.head_dim)
    )


def rope_in_product(rows: int, weight: Weight, matvec: bool, head_dim: int) -> bool:
    """Whether a decode step's q|k|v product rotates q and k and stores the new keys and values in its epilogue
    (attention_kernels.ROPE "product"): where it goes through kernels.matmul_rows and a tile fits in a head; else
    decode_attention does it (rope_store's launch, or inside the attention kernel)."""
    return (
        attention_kernels.ROPE == "product" and takes_matmul_rows(rows, weight, matvec) and kernels.rope_fits(head_dim)
    )


class Local:
    """One process: nothing to exchange. engine/tp.py's `TensorParallel` has the same methods."""

    rank, world = 0, 1

    def reduce_project(self, x, weight, residual, swiglu=False, matvec=False) -> torch.Tensor:
        """residual + x @ weight.T summed over ranks (here: one rank)."""
        return project(x, weight, residual, swiglu, matvec=matvec)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Give every rank rank 0's values of `tensor` (here: nothing to do)."""

    def broadcast_host(self, tensor: torch.Tensor) -> None:
        """The same for a CPU tensor."""

    def command(self, op: int, *args: int) -> None:
        """Tell the other ranks which step to run next (here: there are none)."""


class Block(torch.nn.Module):
    """One decoder layer: pre-norm attention and SwiGLU feed-forward, each adding into the residual."""

    def __init__(self, model: Transformer, index: int):
        super().__init__()
        self.model, self.index = [model], index  # a list: not a submodule (no cycle in module traversal)
        self.attention_norm: torch.Tensor | None = None  # [dim]
        self.wqkv: Weight | None = None  # [(heads + 2 * kv_heads) * head_dim, dim] (this rank's heads)
        self.wo: Weight | None = None  # [dim, heads * head_dim]
        self.ffn_norm: torch.Tensor | None = None  # [dim]
        self.w13: Weight | None = None  # [2 * ffn, dim]: gate rows, then up rows
        self.w2: Weight | None = None  # [dim, ffn]

    def forward(
        self, hidden, rope, mask, tables, positions, kv_length: int, lengths=None, fresh: bool = False, norms=None
    ) -> torch.Tensor:
        """hidden [B*T, dim] -> [B*T, dim]; block tables [B, width]; positions [B, T]; mask [B, 1, T, kv_length],
        or None for a decode step through the paged attention kernel (attention_kernels.py), which then
        takes lengths [B] (each row's positions + 1, computed once a step). rope: as Transformer.rope gives it
        (angles [B*T, head_dim / 2] where the kernels rotate a prompt). fresh: see Transformer.forward.
        norms: a step's EpilogueNorms (`norms_in_epilogues`): this layer's RMSNorm inputs come from the products
        before them, and its down product leaves the next layer's.

        hidden is the model's dtype, or float32 after the first all-reduce of a one-row step with
        symmetric memory (engine/tp.py): every consumer of it is then a matvec, which reads any float.
        """
        model = self.model[0]
        B, T = positions.shape
        H, Hkv, D = model.heads, model.kv_heads, model.args.head_dim
        eps, matvec, comm = model.args.norm_eps, model.matvec, model.comm
        cache = model.cache
        keys, values = cache.keys[self.index], cache.values[self.index]
        width = cache.blocks_for(kv_length)  # table entries a decode step's bucket reaches: the kernel's grid
        store = None  # the rotary and the new keys and values in q|k|v's epilogue (attention_kernels.ROPE "product")
        if mask is None and rope_in_product(B * T, self.wqkv, matvec, D):
            store = kernels.RopeStore(*rope, positions[:, 0], tables[:, :width], keys, values, H)
        if norms is not None and norms.attention is not None:  # RMSNorm's input from the last layer's down product
            qkv = project(norms.attention.scaled, self.wqkv, matvec=matvec, normed=norms.attention, rope=store)
        else:
            qkv = project(hidden, self.wqkv, matvec=matvec, norm=(self.attention_norm, eps), rope=store)
        # qkv: [B*T, (H + 2 Hkv) D]
        if mask is None:  # one token per row (CUDA): rotate and store, then read the blocks in place
            attention = attention_kernels.decode_attention(  # [B, H * D]
                qkv, *rope, positions[:, 0], lengths, tables[:, :width], keys, values, H, cache.counters,
                stored=store is not None,
            )  # fmt: skip
        else:
            if model.attention_kernel:  # CUDA: q and k rotated in place, k and v stored, in one launch
                # every head of the B*T tokens at once, a prompt's T tokens sharing its block table
                attention_kernels.rope_store(
                    qkv, *rope, positions.reshape(-1), tables, keys, values, H, tokens_per_table=T, keys_in_place=fresh
                )
                qk = qkv[:, : (H + Hkv) * D].view(B, T, H + Hkv, D)
            else:
                qk = apply_rope(qkv[:, : (H + Hkv) * D].view(B, T, H + Hkv, D), rope)  # [B, T, H + Hkv, D]
            v = qkv[:, (H + Hkv) * D :].view(B, T, Hkv, D)
            if not model.attention_kernel:
                cache.write(self.index, tables, positions, qk[:, :, H:], v)
            if fresh:  # what the blocks now hold (before a float8 cache's rounding), without gathering it back
                keys, values = qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
            else:
                keys, values = cache.read(self.index, tables, kv_length)  # [B, Hkv, L, D], gathered from the blocks
                keys, values = keys.to(qk.dtype), values.to(qk.dtype)  # a float8 cache's, widened (else no-ops)
            extra = {"enable_gqa": True} if Hkv != H else {}
            with sdpa_kernel(PROMPT_ATTENTION):
                attention = F.scaled_dot_product_attention(
                    qk[:, :, :H].transpose(1, 2), keys, values, attn_mask=mask, **extra
                )  # [B, H, T, D]
            attention = attention.transpose(1, 2).reshape(B * T, H * D)
        if norms is not None:  # one rank: no all-reduce between a product and its epilogue
            ffn_input = kernels.Normed.empty(B * T, hidden.shape[1], hidden.dtype, hidden.device, eps)
            hidden = project(attention, self.wo, hidden, matvec=matvec, norm_out=(self.ffn_norm, ffn_input))
            activated = project(ffn_input.scaled, self.w13, matvec=matvec, normed=ffn_input, gated=True)  # [B*T, ffn]
            norms.attention = None
            if self.index + 1 == len(model.layers):  # the last layer: the output's RMSNorm is a launch of its own
                return project(activated, self.w2, hidden, matvec=matvec)
            norms.attention = kernels.Normed.empty(B * T, hidden.shape[1], hidden.dtype, hidden.device, eps)
            next_norm = model.layers[self.index + 1].attention_norm
            return project(activated, self.w2, hidden, matvec=matvec, norm_out=(next_norm, norms.attention))
        hidden = comm.reduce_project(attention, self.wo, hidden, matvec=matvec)
        if takes_matmul_rows(B * T, self.w13, matvec):
            activated = project(hidden, self.w13, matvec=matvec, norm=(self.ffn_norm, eps), gated=True)  # [B*T, ffn]
            return comm.reduce_project(activated, self.w2, hidden, matvec=matvec)
        gate_up = project(hidden, self.w13, matvec=matvec, norm=(self.ffn_norm, eps))  # [B*T, 2 ffn]
        return comm.reduce_project(gate_up, self.w2, hidden, swiglu=True, matvec=matvec)


class Transformer(torch.nn.Module):
    """A LLaMA for inference, or one tensor-parallel rank of it (`comm.rank` of `comm.world`).

    Weights are set by engine/load.py; `setup_cache` allocates the KV cache before the first forward.
    """

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype, device, comm=None):
        super().__init__()
        self.args, self.dtype, self.device = args, dtype, torch.device(device)
        self.comm = comm or Local()
        world = self.comm.world
        check_shardable(args, world)
        self.heads, self.kv_heads, self.ffn = args.n_heads // world, args.n_kv_heads // world, args.ffn_dim // world
        self.embed: torch.Tensor | None = None  # [vocab, dim] (every rank holds it whole)
        self.layers = torch.nn.ModuleList(Block(self, i) for i in range(args.n_layers))
        self.norm: torch.Tensor | None = None  # [dim]
        self.output: Weight | None = None  # [vocab, dim] (whole on every rank: logits need no gather)
        half = args.head_dim // 2
        # Hugging Face's LlamaRotaryEmbedding, computed the same way so float32 results agree bit for bit
        self.inv_freq = 1.0 / (
            args.rope_theta
            ** (torch.arange(0, 2 * half, 2, dtype=torch.int64, device=self.device).float() / (2 * half))
        )  # [head_dim / 2]
        self.cache: KVCache | None = None
        self.matvec = False  # decode-step products through kernels.matvec / matmul_rows (set by the runner on CUDA)
        self.attention_kernel = False  # decode attention through attention_kernels (set by the runner on CUDA)

    def setup_cache(self, slots: int, context: int, dtype: torch.dtype | None = None, **paging) -> KVCache:
        """A paged KV cache of `slots` rows up to `context` positions, in `dtype` (default: the model's; see
        cache.KV_CACHE_DTYPES), paging: cache.KVCache's blocks, block_size."""
        self.cache = None  # free the old one first
        self.cache = KVCache(
            self.args.n_layers, slots, self.kv_heads, context, self.args.head_dim, dtype or self.dtype, self.device,
            **paging,
        )  # fmt: skip
        return self.cache

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        kv_length: int,
        tables: torch.Tensor | None = None,
        first_row: int = 0,
        last: torch.Tensor | None = None,
        fresh: bool = False,
    ) -> torch.Tensor:
        """Logits of one token per row: input_ids, positions [B, T] go to the cache rows whose block tables
        are tables [B, width] (a device tensor: what the runner sends), or without tables to cache rows
        first_row..first_row+B-1, given blocks here as needed (direct calls: tests, tools).

        Each token attends to its row's cached tokens at positions <= its own, among the first
        kv_length. last [B]: which of the T tokens gives the row's logits (default: the last).
        fresh: every row's tokens are its first, at positions 0..T-1, and kv_length is T (a prompt's first
        piece): attention takes their keys and values from this forward's own q|k|v instead of gathering
        back what it just stored (the same values; a float8 cache's before its rounding, as vLLM's prompt
        attention takes them: the rounding only reaches later pieces and decode steps).
        Returns [B, vocab] in the model's dtype.
        """
        B, T = input_ids.shape
        if fresh and kv_length != T:
            raise ValueError(f"a fresh prefill attends to its own {T} positions, not {kv_length}")
        hidden = F.embedding(input_ids.reshape(-1), self.embed)  # [B*T, dim]
        fused = T == 1 and self.attention_kernel  # decode through attention_kernels.decode_attention
        rope = self.rope(positions, angles=self.attention_kernel)
        if tables is None:
            for row in range(first_row, first_row + B):
                self.cache.ensure(row, int(positions.max()) + 1)
            tables = self.cache.tables[first_row : first_row + B].to(positions.device, torch.long)
        if self.attention_kernel and not fused:
            # a fresh copy for rope_store's kernel: the runner's tables are a slice of its packed rows, starting at
            # an offset that depends on the prompts' length, and Triton compiles a kernel per pointer alignment
            tables = tables.clone()
        mask = None
        if not fused:
            kv_index = torch.arange(kv_length, device=positions.device)
            # [B, 1, T, L]: causal by position, additive (a boolean mask costs SDPA two conversions per layer)
            hidden_mask = (kv_index[None, None, :] > positions[:, :, None])[:, None]
            mask = torch.zeros(hidden_mask.shape, dtype=self.dtype, device=positions.device).masked_fill_(
                hidden_mask, float("-inf")
            )
        lengths = positions[:, 0] + 1 if fused else None  # [B]
        norms = EpilogueNorms() if fused and norms_in_epilogues(self, B) else None
        for layer in self.layers:
            hidden = layer(hidden, rope, mask, tables, positions, kv_length, lengths, fresh, norms)
        if T > 1:
            index = last if last is not None else torch.full((B,), T - 1, device=hidden.device)
            hidden = hidden.view(B, T, -1)[torch.arange(B, device=hidden.device), index]  # [B, dim]
        return project(hidden, self.output, matvec=self.matvec, norm=(self.norm, self.args.norm_eps))  # [B, vocab]

    def rope(self, positions: torch.Tensor, angles: bool = False) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Rotary tables for positions [B, T]: (cos, sin) [B, T, 1, head_dim], or for T == 1 the
        rotation matrices [B, head_dim, head_dim] (one batched matmul per layer instead of six kernels),
        or with angles (attention_kernels' rope_store) float32 (cos, sin) [B*T, head_dim / 2]."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, head_dim / 2]
        if angles:
            freqs = freqs.reshape(-1, freqs.shape[-1])  # [B*T, head_dim / 2]
            return freqs.cos(), freqs.sin()
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, head_dim]
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        if positions.shape[1] == 1:
            return rotation_matrices(cos[:, 0], sin[:, 0])
        return cos[:, :, None], sin[:, :, None]

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (they also stop when this process exits)."""
        close = getattr(self.comm, "close", None)
        if close is not None:
            close()

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (quantized weights counted with their scales and zeros)."""
        tensors = [self.embed, self.norm, self.output]
        for layer in self.layers:
            tensors += [layer.attention_norm, layer.wqkv, layer.wo, layer.ffn_norm, layer.w13, layer.w2]
        seen, total = set(), 0
        for t in tensors:
            if isinstance(t, QUANTIZED):
                total += t.nbytes
            elif t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """x [B, T, heads, head_dim] rotated by its positions (LLaMA's half-split rotary, as in Hugging Face)."""
    if isinstance(rope, torch.Tensor):  # T == 1: x @ R per row
        B, _, heads, D = x.shape
        return torch.bmm(x.reshape(B, heads, D), rope).view(B, 1, heads, D)
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per row, the matrix R with x @ R == x * cos + rotate_half(x) * sin.

    cos, sin: [B, head_dim]. rotate_half(x) = cat(-x[half:], x[:half]), so output j < half takes
    -x[j + half] * sin[j] and output j >= half takes x[j - half] * sin[j].
    """
    half = cos.shape[1] // 2
    rotation = torch.diag_embed(cos)  # [B, head_dim, head_dim]
    index = torch.arange(half, device=cos.device)
    rotation[:, index + half, index] = -sin[:, :half]
    rotation[:, index, index + half] = sin[:, half:]
    return rotation


def check_shardable(args: ModelArgs, world: int) -> None:
    """Refuse a split that does not divide the heads: each rank must own whole query and KV heads.

    KV heads are not replicated: a grouped-query model with fewer KV heads than GPUs (e.g. 8 KV heads
    on 16 GPUs) is refused rather than silently holding copies; use fewer GPUs.
    """
    problems = []
    if args.n_heads % world:
        problems.append(f"{args.n_heads} attention heads")
    if args.n_kv_heads % world:
        problems.append(f"{args.n_kv_heads} key/value heads")
    if args.ffn_dim % world:
        problems.append(f"a feed-forward width of {args.ffn_dim}")
    if problems:
        raise VicunaflowError(
            f"--num-gpus {world}: the model has {' and '.join(problems)}, which do not split evenly over "
            f"{world} ranks (each rank holds whole heads; key/value heads are not replicated); "
            f"choose a --num-gpus that divides them"
        )
