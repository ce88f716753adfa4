"""The forward passes the scheduler launches: prefill chunks and decode steps, over the paged KV cache.

On one GPU the host cost of launching a step's few hundred kernels is as large as reading the
weights, so each decode step is padded to a bucket of rows (`row_buckets`: 1, 2, 4, 8, then multiples
of 8, coarser above 128) and replayed from a CUDA graph captured once per bucket. On CUDA the decode
attention is the paged Triton kernel (attention_kernels.py), which reads each row's blocks up to its
own length: a graph per row bucket and `KERNEL_KV_BUCKETS` width (its grid's) serves every context length.
Without it (no Triton) the keys and values are gathered for SDPA, and buckets also round the attended
length up to steps of 256.
Padding rows have empty block tables: they write the scratch block and read nothing anyone wrote.
Elsewhere (CPU): exact shapes, eagerly.

`warm_up` captures every bucket (and so autotunes every Triton matvec shape) and runs each prefill
length class once when the engine starts, then clears the cache: nothing is compiled, captured or
tuned while a request waits.

Prefill forwards are graphs too where they can be (one GPU, CUDA graphs on): a chunk of prompts' first
pieces (every piece at position 0, no prompt log-probabilities) is padded to a bucket of rows (1, 2, 4,
8) and of length (the warm-up's lengths: 16, 32, ... the chunk size) and replayed. Eagerly, a 7B's
128-token prefill on an H200 took 24 ms of the engine's time, most of it launching ~800 kernels from
Python, against ~5 ms of GPU work. Padding attends over the bucket's length: the causal mask keeps each
real position to its own prompt's earlier ones, and padded positions write the row's own block past
its tokens or the scratch block, as an eager chunk's padding does. A long prompt's later piece, alone
in its chunk, is padded the same way and attends up to a multiple of the chunk size
(`prefill_kv_lengths`): a 1,500-token prompt joining running streams had stalled them for a whole eager
forward per piece. Other chunks (several rows with a later piece, log-probabilities) run eagerly.

Block tables are rank 0's (engine/cache.py): a step's inputs are one tensor [rows, 2 + width] per
bucket, each row's token, position and block table, filled on the host and copied in one go. A step's
tokens may be the previous step's sampled tokens, still on the device, so the host can queue step t+1
before step t has finished (`Engine._decode_step`).

Tensor parallelism: rank 0's runner first tells the other ranks what it runs (`comm.command`: op and
a few integers over a gloo group); their loop (engine/tp.py) calls the same runner methods. A decode
step's inputs, block tables included, go from rank 0 to the others inside the step itself
(`comm.broadcast` at the start of the forward, captured in the graph), so a step queued from tokens
still on rank 0's GPU needs no host round trip on any rank; a prefill's go with its host tensor.
Rows moving, taking and giving back blocks are table edits on rank 0 alone.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence

import torch

from vicunaflow import kernels as triton_kernels
from vicunaflow.attention_kernels import decode_attention
from vicunaflow.engine.cache import BLOCK_SIZE, KV_CACHE_DTYPES, resolve_kv_cache_dtype
from vicunaflow.engine.model import Transformer, project
from vicunaflow.engine.sampling import TokenLogprob, logprobs_of, to_entries

log = logging.getLogger(__name__)

# The dtype of a decode step's inputs (tokens, positions, block tables: all below 2**31). The paged attention kernel
# loads each row's length and block ids: from int64 ones its position arithmetic ran in 64 bits. On an H200, inside 7B
# steps of 32 / 64 / 256 rows (tiles of 64 in 4 warps), it took 46.4 / 81.5 / 313.2 µs a layer with int64 inputs and
# 39.8 / 70.7 / 278.6 with int32 ones (two calls: attention_in_steps_inputs_7b_h200.json, _int32_7b_h200.json); in
# the first, launched alone over the same cache, int32 block tables (lengths still int64) gave 45.3 / 78.3 / 289.7
# against 47.1 / 81.4 / 298.6. bench_chat.py --profile-attention-tiles, seventeenth session.
STEP_INPUTS = torch.int32


class Op(enum.IntEnum):
    SETUP = 1  # slots, context, cuda_graphs, padded, kernels, KV blocks, block size, KV dtype (its index)
    PREFILL = 2  # chunks, padded length; then the chunks and their block tables as one host tensor
    STEP = 3  # bucket rows, attended length
    STOP = 5
    CLEAR = 6  # zero the KV cache (after warm-up)


@dataclasses.dataclass
class PrefillChunk:
    """The next piece of one prompt: tokens for positions start.. of cache row `row`."""

    tokens: list[int]
    start: int
    row: int
    logprobs: int | None = None  # k: the log-probabilities of `targets` with the top k
    targets: list[int] = dataclasses.field(default_factory=list)  # prompt tokens start + 1 ..., at most len(tokens)


class Runner:
    KV_STEP = 256
    # With the attention kernel, the decode graphs' attended lengths: its grid has a program for every split of
    # the table's width, and those past a row's length exit at once but still launch. With 128-token prompts and
    # 256-token replies at 256 rows, a 2,048-wide grid's idle programs cost 8% of a 7B layer's attention with
    # splits of 256 (353 against 327 µs, docs/benchmarks.md, eighth session), 1.2% with the splits of 512 many
    # rows take now (266.4 against 263.2, sixteenth); steps whose rows all end within 512 replay a narrower one,
    # which still counts for steps of up to 8 rows (splits of 64; not measured again).
    KERNEL_KV_BUCKETS = (512,)
    PROMPT_CHUNK = 512  # prompt positions whose logits are computed at once (prompt log-probabilities)
    PREFILL_ROWS = (1, 2, 4, 8)  # prompts a prefill graph takes at once (rows x length <= the chunk size)

    def __init__(
        self,
        model: Transformer,
        slots: int,
        context: int,
        *,
        cuda_graphs: bool,
        padded: bool,
        kernels: bool,
        blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
        kv_cache_dtype: str = "auto",
    ):
        """slots rows of up to `context` tokens; blocks: KV cache blocks of block_size positions (default:
        enough for every row at full context), in kv_cache_dtype (cache.KV_CACHE_DTYPES). kernels: Triton matvec for
        one-row products."""
        self.model, self.comm = model, model.comm
        self.leader = self.comm.rank == 0
        dtype = resolve_kv_cache_dtype(kv_cache_dtype, model.dtype)  # an unknown name: refused before any rank is told
        if self.leader:
            self.comm.command(
                Op.SETUP, slots, context, int(cuda_graphs), int(padded), int(kernels), blocks or 0, block_size,
                list(KV_CACHE_DTYPES).index(kv_cache_dtype),  # the other ranks receive integers
            )  # fmt: skip
        self.cache = model.setup_cache(slots, context, dtype, blocks=blocks or None, block_size=block_size)
        model.matvec = kernels
        self.kernels = kernels
        self.device = model.device
        self.attention_kernel = self.device.type == "cuda" and triton_kernels.available() and self._kernel_runs()
        model.attention_kernel = self.attention_kernel
        self.padded, self.cuda_graphs = padded or cuda_graphs, cuda_graphs
        self.row_buckets = row_buckets(slots)
        self.kv_buckets = self.attended_lengths(context)
        self.buckets: dict[tuple[int, int], dict] = {}
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        # prefill buckets (warm_up sets them on one GPU with graphs): padded lengths, the attended lengths of
        # later pieces (multiples of the chunk size), and graphs by (rows, length, attended length)
        self.prefill_lengths: list[int] = []
        self.prefill_kv_lengths: list[int] = []
        self.prefill_graphs: dict[tuple[int, int, int], dict] = {}

    def _kernel_runs(self) -> bool:
        """Build the decode step's attention kernel(s) (attention_kernels) for this cache's shapes now;
        if they cannot build here, say so and gather blocks for SDPA instead. (Ranks may differ: attention
        involves no collective.) They write only the scratch block 0."""
        cache, heads, kv_heads = self.cache, self.model.heads, self.model.kv_heads
        head_dim = cache.keys[0].shape[-1]
        qkv = torch.zeros(1, (heads + 2 * kv_heads) * head_dim, dtype=self.model.dtype, device=self.device)
        angles = torch.zeros(1, head_dim // 2, device=self.device)
        tables = torch.zeros(1, cache.width, dtype=STEP_INPUTS, device=self.device)  # the kernels the steps run
        first = torch.zeros(1, dtype=STEP_INPUTS, device=self.device)
        try:
            decode_attention(
                qkv, angles, angles, first, first + 1, tables, cache.keys[0], cache.values[0], heads, cache.counters
            )
        except Exception as err:
            log.warning(
                "decode attention kernels unavailable (%s: %s); decode attention gathers blocks for SDPA",
                type(err).__name__,
                err,
            )
            return False
        return True

    # -- prefill ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], first_row: int, prompt_logprobs: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """Whole prompts in one forward into rows first_row...: each one's next-token logits [n, vocab] and,
        where `prompt_logprobs` gives a k, every prompt token's log-probability with the k most likely
        tokens at its position (the first token's is None). The engine itself prefills in chunks
        (`prefill_chunks`); this is for tools that feed a prompt whole."""
        wanted = list(prompt_logprobs or [None] * len(prompts))
        chunks = [
            PrefillChunk(p, 0, first_row + i, k, p[1:] if k is not None else [])
            for i, (p, k) in enumerate(zip(prompts, wanted, strict=True))
        ]
        logits, entries = self.prefill_chunks(chunks)
        return logits, [
            None if e is None else [TokenLogprob(p[0], None, []), *e] for p, e in zip(prompts, entries, strict=True)
        ]

    @torch.inference_mode()
    def prefill_chunks(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """One padded forward of several prompts' next pieces, each at its own start position in its own row.

        Returns the logits after each piece's last token [n, vocab] and, for each chunk with `logprobs` k,
        its `targets`' log-probabilities (token start + 1 + i from position start + i) with the top k.
        """
        n, length = len(chunks), max(len(c.tokens) for c in chunks)
        key = self._prefill_bucket(chunks)
        if key is not None:
            return self._padded_prefill(chunks, *key), [None] * n
        packed = self._pack(chunks, n, length)
        self.comm.command(Op.PREFILL, n, length)
        self.comm.broadcast_host(packed)
        if all(c.logprobs is None for c in chunks):
            return self._prefill(packed), [None] * n
        # Every position's hidden state, taken from the last layer's output: the forward itself returns one
        # row's logits, and only this rank needs the others (the output projection is whole on every rank).
        captured = []
        hook = self.model.layers[-1].register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            logits = self._prefill(packed)
        finally:
            hook.remove()
        hidden = captured[0].view(n, length, -1)  # [n, length, dim]
        entries = [
            None if c.logprobs is None else self._prompt_logprobs(hidden[i, : len(c.targets)], c.targets, c.logprobs)
            for i, c in enumerate(chunks)
        ]
        return logits, entries

    def _pack(self, chunks: list[PrefillChunk], rows: int, length: int) -> torch.Tensor:
        """The chunks as one host tensor [rows, length + 2 + width], per row: ids, start, count, block table
        (the rows' blocks taken first). Rows past the chunks pad: one token at position 0 of an empty table
        (the scratch block)."""
        packed = torch.zeros(rows, length + 2 + self.cache.width, dtype=torch.long)
        packed[:, length + 1] = 1
        for i, chunk in enumerate(chunks):
            self.cache.ensure(chunk.row, chunk.start + len(chunk.tokens))
            packed[i, : len(chunk.tokens)] = torch.tensor(chunk.tokens)
            packed[i, length : length + 2] = torch.tensor([chunk.start, len(chunk.tokens)])
            packed[i, length + 2 :] = self.cache.tables[chunk.row]
        return packed

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
        """targets[i]'s log-probability from hidden [len(targets), dim] row i (float32 log_softmax), PROMPT_CHUNK
        positions at a time so a long prompt never holds [length, vocab] floats at once."""
        model = self.model
        wanted = torch.tensor(targets, device=self.device)  # [T]
        entries: list[TokenLogprob] = []
        for start in range(0, len(targets), self.PROMPT_CHUNK):
            stop = min(start + self.PROMPT_CHUNK, len(targets))
            logits = project(hidden[start:stop], model.output, norm=(model.norm, model.args.norm_eps))  # [c, vocab]
            chosen, values, ids = logprobs_of(logits, wanted[start:stop], k)
            host = chosen.tolist(), values.tolist(), ids.tolist()
            entries += to_entries(targets[start:stop], host, [k] * (stop - start))
        return entries

    @torch.inference_mode()
    def remote_prefill(self, n: int, length: int) -> None:
        packed = torch.empty(n, length + 2 + self.cache.width, dtype=torch.long)
        self.comm.broadcast_host(packed)
        self._prefill(packed)

    def _prefill(self, packed: torch.Tensor) -> torch.Tensor:
        length = packed.shape[1] - 2 - self.cache.width
        kv_length = int((packed[:, length] + packed[:, length + 1]).max())  # host values: the attended length is exact
        fresh = kv_length == length and bool((packed[:, length] == 0).all())
        return self._prefill_forward(packed.to(self.device), length, kv_length, fresh)

    def _prefill_forward(self, packed: torch.Tensor, length: int, kv_length: int, fresh: bool) -> torch.Tensor:
        """The forward of packed [n, length + 2 + width] on the device (per row: ids, start, count, block
        table) attending to the first kv_length positions; the logits of each row's last token [n, vocab].
        fresh: every row starts at position 0 and kv_length is length (Transformer.forward's)."""
        ids, start, count, tables = (
            packed[:, :length],
            packed[:, length],
            packed[:, length + 1],
            packed[:, length + 2 :],
        )
        # positions start..start+count-1, then padding: written past the row's tokens (its own block, where a
        # later chunk or decode step overwrites them before any query attends there, or the scratch block)
        positions = (start[:, None] + torch.arange(length, device=self.device)).clamp_(max=self.cache.context - 1)
        return self.model(ids, positions, kv_length=kv_length, tables=tables, last=count - 1, fresh=fresh)

    def _prefill_bucket(self, chunks: list[PrefillChunk]) -> tuple[int, int, int] | None:
        """The (rows, length, attended length) bucket a chunk pads to, or None: it runs as it is. First pieces
        attend within their bucket's length; a later piece, alone, up to the next of `prefill_kv_lengths`
        beyond its bucket's length (a bucket attending to its own length is a fresh one: first pieces')."""
        if not self.prefill_lengths or any(c.logprobs is not None for c in chunks):
            return None
        rows = next((r for r in self.PREFILL_ROWS if r >= len(chunks)), None)
        longest = max(len(c.tokens) for c in chunks)
        length = next((n for n in self.prefill_lengths if n >= longest), None)
        if rows is None or length is None or rows * length > self.prefill_lengths[-1]:
            return None
        if all(c.start == 0 for c in chunks):
            return rows, length, length
        end = chunks[0].start + len(chunks[0].tokens)
        kv_length = next((n for n in self.prefill_kv_lengths if n >= end and n > length), None)
        return None if len(chunks) > 1 or kv_length is None else (1, length, kv_length)

    def _padded_prefill(self, chunks: list[PrefillChunk], rows: int, length: int, kv_length: int) -> torch.Tensor:
        """Pieces of prompts padded to `rows` x `length`, attending to kv_length positions, replayed from their
        graph (eagerly when it has none: tests, or a failed capture); each piece's next-token logits
        [len(chunks), vocab]."""
        host = self._pack(chunks, rows, length)
        bucket = self.prefill_graphs.get((rows, length, kv_length))
        if bucket is None:
            return self._prefill_forward(host.to(self.device), length, kv_length, kv_length == length)[: len(chunks)]
        bucket["packed"].copy_(host)  # pageable memory: the host buffer is free again when this returns
        bucket["graph"].replay()
        return bucket["logits"][: len(chunks)]

    def _capture_prefills(self, lengths: list[int]) -> None:
        """A graph for every prefill bucket: first pieces' (rows, length), later pieces' (length, attended
        length); on a failure, prefill stays eager (and says why)."""
        chunk, context = lengths[-1], self.cache.context
        kv_lengths = sorted({min(n, context) for n in range(chunk, context + chunk, chunk)})
        buckets = [(rows, n, n) for rows in self.PREFILL_ROWS for n in lengths if rows * n <= chunk]
        buckets += [(1, n, kv) for n in lengths for kv in kv_lengths if kv > n]
        try:
            for rows, length, kv_length in buckets:
                packed = torch.zeros(rows, length + 2 + self.cache.width, dtype=torch.long, device=self.device)
                packed[:, length + 1] = length  # whole rows of the scratch block
                graph, logits = self._graph(
                    lambda packed=packed, length=length, kv=kv_length: self._prefill_forward(
                        packed, length, kv, kv == length
                    )
                )
                self.prefill_graphs[rows, length, kv_length] = {"packed": packed, "graph": graph, "logits": logits}
        except Exception as err:
            log.warning("prefill graph capture failed (%s: %s); prefill runs eagerly", type(err).__name__, err)
            self.prefill_graphs = {}
            return
        self.prefill_lengths, self.prefill_kv_lengths = list(lengths), kv_lengths

    # -- decode -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(
        self, tokens: list[int] | torch.Tensor, lengths: list[int], pieces: Sequence[PrefillChunk] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens[i] goes to cache position lengths[i] of row i (tokens: a list, or a [n] device tensor); the
        rows take the blocks that needs (the engine has checked there are enough).

        pieces: prompt pieces riding in the step (their rows' blocks already taken): each token a row of its
        own after the n decode rows, token j at position start + j of its piece's cache row, attending to that
        row's positions up to its own, as a prefill would, in a step that reads the weights once anyway.

        Returns (logits [n + piece tokens, vocab] in the model's dtype, greedy tokens [n + piece tokens]) on
        the device, without waiting.
        """
        n = len(lengths)
        for row in self.cache.growing(lengths):
            self.cache.ensure(row, lengths[row] + 1)
        total = n + sum(len(piece.tokens) for piece in pieces)
        end = max([*lengths, *(piece.start + len(piece.tokens) - 1 for piece in pieces)]) + 1
        rows, kv_length = self.bucket_key(total, end)
        self.comm.command(Op.STEP, rows, kv_length)
        bucket = self._bucket(rows, kv_length)
        self._fill(bucket, tokens, lengths, pieces)
        logits, greedy = self._run(bucket)
        return logits[:total], greedy[:total]

    @torch.inference_mode()
    def remote_step(self, rows: int, kv_length: int) -> None:
        self._run(self._bucket(rows, kv_length))

    def attended_lengths(self, context: int) -> list[int]:
        """The attended lengths decode steps are bucketed to: with the attention kernel, which reads each row up
        to its own length, its grid's widths alone (KERNEL_KV_BUCKETS and the context); else steps of KV_STEP."""
        if self.attention_kernel:
            return sorted({min(length, context) for length in (*self.KERNEL_KV_BUCKETS, context)})
        return sorted({min(s, context) for s in range(self.KV_STEP, context + self.KV_STEP, self.KV_STEP)})

    def bucket_key(self, rows: int, kv_length: int) -> tuple[int, int]:
        """The (rows, attended length) a step of `rows` rows attending up to kv_length positions runs as."""
        if self.padded or self.attention_kernel:  # the kernel's grid width: a few values, each compiled once
            kv_length = min(next(b for b in self.kv_buckets if b >= kv_length), self.cache.context)
        if not self.padded:
            return rows, kv_length
        return next(b for b in self.row_buckets if b >= rows), kv_length

    # -- warm-up ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self, prefill_lengths: Sequence[int]) -> int:
        """Run every decode bucket once (capturing its graph, autotuning its matvec shapes) and one prefill
        of each length in `prefill_lengths` (on one GPU with graphs, then capture the prefill buckets of
        those lengths), then zero the cache; returns how many decode shapes ran.

        Decode shapes run with empty block tables (the scratch block); the prefills borrow row 0's blocks
        and give them back. Zeroing the cache after it leaves nothing a request could read (a request only
        reads positions it wrote itself anyway).
        """
        for length in prefill_lengths:
            self.prefill_chunks([PrefillChunk([0] * length, 0, 0)])
            self.cache.release(0)
        if self.cuda_graphs and self.comm.world == 1 and prefill_lengths:
            self._capture_prefills(sorted(prefill_lengths))
        shapes = 0
        if self.padded:
            for kv_length in self.kv_buckets:
                for rows in self.row_buckets:
                    self.comm.command(Op.STEP, rows, kv_length)
                    bucket = self._bucket(rows, kv_length)
                    self._fill(bucket, [0] * rows, [0] * rows)
                    self._run(bucket)
                    shapes += 1
        self.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return shapes

    def clear(self) -> None:
        """Zero the KV cache on every rank."""
        self.comm.command(Op.CLEAR)
        self.cache.clear()

    def _bucket(self, rows: int, kv_length: int) -> dict:
        if not self.padded:
            return self._buffers(rows, kv_length, reused=False)
        key = (rows, kv_length)
        if key not in self.buckets:
            self.buckets[key] = self._buffers(rows, kv_length)
        return self.buckets[key]

    def _buffers(self, rows: int, kv_length: int, reused: bool = True) -> dict:
        # tokens and positions travel in one host->device copy per step, from pinned memory on CUDA. A
        # bucket kept for reuse has two host buffers taken in turn, so filling step t+1 never races the
        # copy of step t still queued; a one-off bucket needs one. Other ranks receive them by broadcast.
        # int32, as the cache's tables are: the attention kernel's index arithmetic on the positions and block ids it
        # loads then runs in 32 bits (STEP_INPUTS says what that saved)
        pinned = self.device.type == "cuda"
        copies = (2 if reused else 1) if self.leader else 0
        shape = (rows, 2 + self.cache.width)  # per row: token, position, block table
        step_inputs = torch.zeros(shape, dtype=STEP_INPUTS, device=self.device)
        return {
            "rows": rows,
            "kv_length": kv_length,
            "host": [torch.zeros(shape, dtype=STEP_INPUTS, pin_memory=pinned) for _ in range(copies)],
            "fills": 0,
            "step_inputs": step_inputs,
        }

    def _fill(
        self, bucket: dict, tokens: list[int] | torch.Tensor, lengths: list[int], pieces: Sequence[PrefillChunk] = ()
    ) -> None:
        n = len(lengths)
        # taken in turn: this buffer's last copy was queued before the step the engine last waited on
        host = bucket["host"][bucket["fills"] % len(bucket["host"])]
        bucket["fills"] += 1
        host[n:] = 0  # padding rows: token 0 at position 0 of an empty table (the scratch block)
        if not isinstance(tokens, torch.Tensor):
            host[:n, 0] = torch.tensor(tokens)
        host[:n, 1] = torch.tensor(lengths)
        host[:n, 2:] = self.cache.tables[:n]
        row = n
        for piece in pieces:  # a row per prompt token, all with the table of the piece's row
            count = len(piece.tokens)
            host[row : row + count, 0] = torch.tensor(piece.tokens)
            host[row : row + count, 1] = torch.arange(piece.start, piece.start + count)
            host[row : row + count, 2:] = self.cache.tables[piece.row]
            row += count
        bucket["step_inputs"].copy_(host, non_blocking=True)
        if isinstance(tokens, torch.Tensor):
            bucket["step_inputs"][:n, 0].copy_(tokens)  # device to device, in stream order

    def _run(self, bucket: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cuda_graphs and bucket.get("graph") is None:
            self._capture(bucket)
        if bucket.get("graph") is not None:
            bucket["graph"].replay()
            return bucket["logits"], bucket["greedy"]
        logits = self._forward(bucket)
        return logits, logits.argmax(dim=-1)

    def _forward(self, bucket: dict) -> torch.Tensor:
        step_inputs = bucket["step_inputs"]
        self.comm.broadcast(step_inputs)  # rank 0's tokens, positions and block tables reach every rank
        return self.model(
            step_inputs[:, 0:1], step_inputs[:, 1:2], kv_length=bucket["kv_length"], tables=step_inputs[:, 2:]
        )

    def _capture(self, bucket: dict) -> None:
        """Warm up on a side stream (writes the same K/V the real step will), then capture the step.

        Every rank captures the same bucket at the same point of the same op sequence, so the
        collectives inside match up.
        """

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            logits = self._forward(bucket)
            return logits, logits.argmax(dim=-1)  # greedy tokens inside the graph

        try:
            graph, (bucket["logits"], bucket["greedy"]) = self._graph(step)
            bucket["graph"] = graph
            log.debug("captured a CUDA graph for %d rows x %d tokens", bucket["rows"], bucket["kv_length"])
        except Exception as err:
            if self.comm.world > 1:  # the other ranks would wait for collectives this rank never runs
                raise
            log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(err).__name__, err)
            self.cuda_graphs = False
            bucket["graph"] = None

    def _graph(self, forward):
        """Run forward() twice on a side stream (first-use work: allocations, autotuning), then capture it in
        the runner's graph pool; returns (graph, what the captured call returned: its static outputs)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = forward()
        return graph, outputs


def row_buckets(slots: int) -> list[int]:
    """Decode batch sizes a step is padded to: 1, 2, 4, 8, then multiples of 8 up to 128, of 16 up to 256,
    of 32 up to 512, ... and `slots` itself.

    Why not powers of two all the way: a padded row costs as much as a real one once a step is no longer
    bound by reading the weights (from ~64 rows on an H200), and 129 rows padded to 256 would double
    the step. Here padding stays under 1/8 of the rows, there are at most 8 buckets per doubling (a
    finite set to capture at start-up: 27 for 256 slots), and no bucket is finer than 8 rows, the
    granularity at which tensor-core matrix products tile their rows anyway.
    """
    sizes, n = {1, 2, 4}, 8
    while n < slots:
        sizes.add(n)
        n += max(8, (1 << (n.bit_length() - 1)) // 8)
    return sorted(size for size in sizes | {slots} if size <= slots)
