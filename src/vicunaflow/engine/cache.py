"""The KV cache the model owns: paged, so memory goes to the tokens requests actually hold.

Keys and values live in blocks of `block_size` positions, [blocks, kv_heads, block_size, head_dim] per
layer, allocated once. A request's row ("slot") owns a list of blocks, its block table: position p of
row r is at offset p % block_size of block tables[r][p // block_size]. Blocks are taken from a free
list as a row grows (`ensure`) and given back when its request ends (`release`), so 256 short chats
and 8 long ones can share the memory that a static layout would give to 16 full-context rows.

Block 0 is scratch: never a row's, it is what unallocated table entries point to, so writes that
belong to nobody (a decode bucket's padding rows, a prompt chunk's padding) land there and nothing
reads them back.

Tables are host tensors kept by the process that schedules (tensor-parallel rank 0). Every forward
receives the table rows of its batch with its inputs (engine/runner.py), so other ranks, which hold
their own KV heads of the same blocks, never need their own copy. Moving a request to another row
moves its table row, not its keys and values.
"""

from __future__ import annotations

import torch

from vicunaflow import VicunaflowError

BLOCK_SIZE = 16  # positions per block: fine-grained enough to waste < 16 tokens per request
# --kv-cache-dtype: "auto" keeps keys and values in the model's dtype; "fp8" stores them as float8 e4m3 (values
# beyond +-448 saturate, 3 mantissa bits, no scales: vLLM's fp8 cache without calibration), half float16's bytes
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype --kv-cache-dtype `name` stores keys and values in, for a model computing in model_dtype."""
    if name not in KV_CACHE_DTYPES:
        raise VicunaflowError(f"--kv-cache-dtype {name!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name] or model_dtype


class KVCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        context: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        *,
        blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        """slots rows of up to `context` positions each; `blocks` (default: enough for every row at full
        context) blocks of `block_size` positions, plus the scratch block."""
        device = torch.device(device)
        self.width = -(-context // block_size)  # table entries per row
        blocks = blocks if blocks is not None else slots * self.width
        if blocks < self.width:
            raise VicunaflowError(
                f"a KV cache of {blocks * block_size} tokens cannot hold one request of {context} tokens; "
                f"give it at least {self.width * block_size}"
            )
        per_block = 2 * kv_heads * block_size * head_dim * dtype.itemsize
        _check_memory(device, layers * (blocks + 1) * per_block, blocks * block_size)
        shape = (blocks + 1, kv_heads, block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        # the decode attention kernel's per (row, KV head) count of finished programs (attention_kernels):
        # zeros between launches, shared by every layer and step
        self.counters = torch.zeros(slots * kv_heads, dtype=torch.int32, device=device)
        self.slots, self.context, self.block_size, self.blocks = slots, context, block_size, blocks
        self.tables = torch.zeros(slots, self.width, dtype=torch.int32)  # host; 0: the scratch block
        self.owned = [0] * slots  # blocks each row holds (its table's first entries)
        self.free = list(range(blocks, 0, -1))  # block ids, popped from the end (low ids first)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- blocks (host bookkeeping, rank 0) --------------------------------------------------------------

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def missing(self, row: int, length: int) -> int:
        """Blocks row must still take to hold `length` positions."""
        return max(0, self.blocks_for(length) - self.owned[row])

    def growing(self, lengths: list[int]) -> list[int]:
        """Rows 0..n-1 holding lengths[i] tokens whose next token needs a new block (a decode step's)."""
        owned, size = self.owned, self.block_size
        return [row for row, length in enumerate(lengths) if length >= owned[row] * size]

    def ensure(self, row: int, length: int) -> None:
        """Give row the blocks for positions 0..length-1 (the scheduler has checked that enough are free)."""
        need = self.missing(row, length)
        if need > len(self.free):
            raise VicunaflowError(f"KV cache: row {row} needs {need} more blocks, {len(self.free)} are free")
        for _ in range(need):
            self.tables[row, self.owned[row]] = self.free.pop()
            self.owned[row] += 1

    def release(self, row: int) -> None:
        """Return row's blocks to the free list."""
        self.free += self.tables[row, : self.owned[row]].tolist()
        self.tables[row].zero_()
        self.owned[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Row source's blocks become row target's (target holds none); source is left empty."""
        if self.owned[target]:
            raise RuntimeError(f"KV cache: row {target} still holds {self.owned[target]} blocks")
        self.tables[target] = self.tables[source]
        self.owned[target] = self.owned[source]
        self.tables[source].zero_()
        self.owned[source] = 0

    def swap_rows(self, a: int, b: int) -> None:
        self.tables[[a, b]] = self.tables[[b, a]]
        self.owned[a], self.owned[b] = self.owned[b], self.owned[a]

    # -- the forward's reads and writes (every rank) ---------------------------------------------------

    def write(self, layer: int, tables: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store new tokens' keys/values: k, v [B, T, kv_heads, head_dim] at positions [B, T] of the rows
        whose block tables are tables [B, width]."""
        blocks = tables.gather(1, positions // self.block_size)  # [B, T]
        offsets = positions % self.block_size
        # advanced indices around a slice: the indexed view is [B, T, kv_heads, head_dim], like k
        dtype = self.keys[layer].dtype  # a float8 cache rounds here (saturating); the decode kernels' stores too
        self.keys[layer][blocks, :, offsets] = k.to(dtype)
        self.values[layer][blocks, :, offsets] = v.to(dtype)

    def read(self, layer: int, tables: torch.Tensor, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, kv_length, head_dim] of the rows whose tables are [B, width],
        gathered from their blocks (a copy: prefill, and decode without the Triton kernel), in the cache's dtype."""
        used = tables[:, : self.blocks_for(kv_length)]  # [B, n]
        B, n = used.shape
        gathered = []
        for tensor in (self.keys[layer], self.values[layer]):
            rows = tensor[used]  # [B, n, kv_heads, block_size, head_dim]
            rows = rows.transpose(1, 2).reshape(B, tensor.shape[1], n * self.block_size, tensor.shape[3])
            gathered.append(rows[:, :, :kv_length])
        return gathered[0], gathered[1]

    def clear(self) -> None:
        """Zero every block (after warm-up: nothing a request could read)."""
        for tensor in self.keys + self.values:
            tensor.zero_()


def _check_memory(device: torch.device, needed: int, tokens: int) -> None:
    """Fail with advice, not an out-of-memory trace, when the KV cache cannot fit next to the weights."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if needed > 0.9 * free:
        raise VicunaflowError(
            f"a KV cache of {tokens} tokens needs {needed / 2**30:.1f} GiB on {device}, {free / 2**30:.1f} GiB "
            f"are free; lower --kv-cache-tokens (default: --max-batch-size x --max-context), or add --num-gpus"
        )
