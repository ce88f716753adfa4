"""Tensor parallelism behind `--num-gpus N`: one process per GPU (or per gloo rank on the CPU).

The user runs the same `vicunaflow chat` / `serve` command, no torchrun: rank 0 (that process) opens
a TCPStore on a free 127.0.0.1 port and spawns ranks 1..N-1 itself. Rank 0 keeps the tokenizer, the
scheduler and HTTP; the other ranks load their shard and then run `serve_rank`: receive an op from
rank 0, run the same runner method (engine/runner.py), repeat.

Split (gpt-fast's tp.py, Megatron's): wqkv and w13 by output rows (whole heads, gate and up alike),
wo and w2 by input columns; embedding, norms and lm_head whole on every rank, so every rank ends a
step with the full logits and nothing is gathered. Two all-reduces a layer add the ranks' partial
sums after wo and w2:

    symm-mem  (CUDA default) torch symmetric memory's one-shot all-reduce: each rank writes its float32
              partial sum into a peer-visible buffer (kernels.matvec stores straight into it) and
              reads the others' over NVLink; ~6.5 µs a call in a CUDA graph against NCCL's ~18 µs,
              which at 80 calls a token is the difference between a 1.4x and a 1.7x speed-up on
              two GPUs. Rows above SYMM_MAX_ROWS (prefill) go through NCCL.
    nccl      dist.all_reduce in the model's dtype (also the fallback when symmetric memory fails).
    gloo      the CPU: the same code in CI (`--device cpu --num-gpus 2`).

Grouped-query models split their KV heads across ranks; a model whose head counts do not divide by N
is refused (model.check_shardable): KV heads are not replicated.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from vicunaflow import VicunaflowError
from vicunaflow.engine.build import LoadSpec, build_model
from vicunaflow.engine.cache import KV_CACHE_DTYPES
from vicunaflow.engine.model import Transformer, project
from vicunaflow.engine.runner import Op, Runner

log = logging.getLogger(__name__)

SYMM_MAX_ROWS = 64  # one-shot all-reduce reads every peer's whole buffer: for decode rows, not prompts
MESSAGE = 9  # int64s per command: op and up to 8 arguments (SETUP's)
FOREVER = datetime.timedelta(days=365)  # an idle server waits for requests; workers exit when rank 0 dies
START_TIMEOUT = 600.0  # seconds for every rank to start and load its shard
_symmetric_memory_used = False  # see TensorParallel.__init__


class TensorParallel:
    """One rank's side of the group: the all-reduces of the forward, and rank 0's orders to the others."""

    def __init__(self, rank: int, world: int, device: torch.device, all_reduce: str, store):
        self.rank, self.world, self.device, self.store = rank, world, device, store
        self.data = dist.group.WORLD  # NCCL on CUDA, gloo on the CPU
        cuda = device.type == "cuda"
        self.control = dist.new_group(backend="gloo", timeout=FOREVER) if cuda else self.data  # host messages
        self.mode = "gloo" if not cuda else ("nccl" if all_reduce == "nccl" else "symm-mem")
        global _symmetric_memory_used
        if self.mode == "symm-mem" and _symmetric_memory_used:
            # torch keeps the first group's symmetric-memory registration under its name, which a later
            # group of this process reuses with a new store: its rendezvous would not complete
            log.warning("tensor parallelism: symmetric memory was set up once in this process already; NCCL")
            self.mode = "nccl"
        _symmetric_memory_used = _symmetric_memory_used or self.mode == "symm-mem"
        self.buffers: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.turn = 0
        self.workers: list = []  # rank 0: the spawned processes
        self.threads = torch.get_num_threads()  # rank 0 gives the CPU threads back on close
        self.closed = False
        self.out_of_step = False  # rank 0 failed inside a forward: the other ranks wait in its collectives
        if self.mode == "symm-mem":
            self._probe_symmetric_memory()

    # -- the forward's collectives ---------------------------------------------------------------------

    def reduce_project(self, x, weight, residual, swiglu=False, matvec=False) -> torch.Tensor:
        """residual + the sum over ranks of x @ weight.T (each rank holds its columns of the product)."""
        if self.mode == "symm-mem" and x.shape[0] <= SYMM_MAX_ROWS:
            buffer = self._buffer(x.shape[0], weight.shape[0])  # [rows, dim] float32, peer-visible
            if matvec and x.shape[0] == 1:  # a float tensor or a quant.QuantWeight: both have the kernel
                # one-row step: rank 0's kernel adds the residual while storing its float32 partial sum,
                # and the sum is the new residual stream, kept in float32 (the kernels read any float
                # input): two launches per all-reduce, no add or cast
                project(x, weight, residual if self.rank == 0 else None, swiglu, out=buffer, matvec=True)
                return torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", self.data.group_name)
            project(x, weight, None, swiglu, out=buffer, matvec=matvec)
            total = torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", self.data.group_name)
            return residual.add_(total)
        # rank 0 alone adds the residual, so the sum over ranks holds it once
        partial = project(x, weight, residual if self.rank == 0 else None, swiglu, matvec=matvec)
        dist.all_reduce(partial, group=self.data)
        return partial

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's values of a device tensor to every rank (NCCL: inside the captured step)."""
        dist.broadcast(tensor, 0, group=self.data)

    def _buffer(self, rows: int, dim: int) -> torch.Tensor:
        """Two peer-visible buffers per shape, used in turn: a rank may start writing the next partial sum
        while a slower peer still reads the previous one, never while it reads the one before that
        (each one-shot all-reduce waits for every rank to arrive)."""
        import torch.distributed._symmetric_memory as symm_mem

        pair = self.buffers.get((rows, dim))
        if pair is None:  # first met in an eager step (a graph's warm-up), at the same op on every rank
            pair = [symm_mem.empty(rows, dim, dtype=torch.float32, device=self.device) for _ in range(2)]
            for buffer in pair:
                symm_mem.rendezvous(buffer, self.data.group_name)
            self.buffers[(rows, dim)] = pair
        self.turn += 1
        return pair[self.turn % 2]

    def _probe_symmetric_memory(self) -> None:
        """One eager one-shot all-reduce; if any rank cannot, every rank uses NCCL instead."""
        ok = torch.ones(1, device=self.device)
        try:
            import warnings

            import torch.distributed._symmetric_memory as symm_mem

            enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None:  # needed by older torch; deprecated (a no-op) later
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    enable(self.data.group_name)
            buffer = self._buffer(1, 8)
            buffer.fill_(self.rank + 1)
            total = torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", self.data.group_name)
            expected = self.world * (self.world + 1) / 2
            if not torch.all(total == expected):
                raise RuntimeError(f"one-shot all-reduce gave {total[0, 0].item()}, expected {expected}")
        except Exception as err:
            log.warning("rank %d: symmetric-memory all-reduce unavailable (%s: %s)", self.rank, type(err).__name__, err)
            ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.data)
        if ok.item() == 0:
            self.mode = "nccl"
            if self.rank == 0:
                log.warning("tensor parallelism: NCCL all-reduce (symmetric memory failed on some rank)")

    # -- rank 0's orders -------------------------------------------------------------------------------

    def command(self, op: int, *args: int) -> None:
        """Rank 0: tell the other ranks which runner method to run next, with up to MESSAGE - 1 integers."""
        if len(args) >= MESSAGE:
            raise ValueError(f"TensorParallel.command: {len(args)} arguments, at most {MESSAGE - 1} (raise MESSAGE)")
        message = torch.zeros(MESSAGE, dtype=torch.long)
        message[0] = op
        message[1 : 1 + len(args)] = torch.tensor(args, dtype=torch.long)
        dist.broadcast(message, 0, group=self.control)

    def receive(self) -> tuple[int, list[int]]:
        message = torch.empty(MESSAGE, dtype=torch.long)
        dist.broadcast(message, 0, group=self.control)
        values = message.tolist()
        return values[0], values[1:]

    def broadcast_host(self, tensor: torch.Tensor) -> None:
        """Rank 0's values of a CPU tensor (a prefill's prompts) to every rank."""
        dist.broadcast(tensor, 0, group=self.control)

    def close(self) -> None:
        """Rank 0: stop the other ranks and leave the group (also at exit)."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0:
            with contextlib.suppress(Exception):
                if all(p.is_alive() for p in self.workers) and not self.out_of_step:
                    self.command(Op.STOP)
            for process in self.workers:
                process.join(timeout=0 if self.out_of_step else 30)  # out of step: STOP was not sent
                if process.is_alive():
                    process.kill()
                    process.join()
        leave_group()
        torch.set_num_threads(self.threads)


def start(world: int, spec: LoadSpec) -> TensorParallel:
    """Rank 0: open the store, spawn ranks 1..world-1 (they load their shards meanwhile), join the group."""
    if dist.is_initialized():
        raise VicunaflowError(
            "a tensor-parallel group is still open in this process: close() the model that opened it first; "
            "if it was closed, its group did not finish closing (logged then): run in a new process"
        )
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=FOREVER)
    context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    workers = [
        context.Process(target=_worker_main, args=(rank, world, store.port, spec), daemon=True, name=f"tp-rank-{rank}")
        for rank in range(1, world)
    ]
    for process in workers:
        process.start()
    try:
        _wait_for(store, workers, "joined")
        comm = _join(0, world, store, spec)
    except BaseException:
        for process in workers:
            process.kill()
        raise
    comm.workers = workers
    atexit.register(comm.close)
    log.info("tensor parallelism: %d ranks (%s), all-reduce %s", world, spec.device_type, comm.mode)
    return comm


def wait_ready(comm: TensorParallel) -> None:
    """Rank 0, after loading its own shard: wait until every other rank has loaded its own, then watch them.

    Only then: a rank that failed to load while rank 0 still loaded is reported here, with its reason, and
    the caller's close() leaves the group (a watch thread would have ended the process)."""
    try:
        _wait_for(comm.store, comm.workers, "ready")
    except BaseException:
        for process in comm.workers:
            process.kill()
        raise
    threading.Thread(target=_exit_if_a_rank_dies, args=(comm,), daemon=True, name="watch-ranks").start()


def serve_rank(model: Transformer, comm: TensorParallel) -> None:
    """Ranks 1..N-1: run what rank 0 orders until it says stop."""
    runner = None
    while True:
        op, args = comm.receive()
        if op == Op.SETUP:
            runner = None  # free the previous engine's cache and graphs first
            slots, context, cuda_graphs, padded, kernels, blocks, block_size, dtype_code = args[:8]
            runner = Runner(
                model,
                slots,
                context,
                cuda_graphs=bool(cuda_graphs),
                padded=bool(padded),
                kernels=bool(kernels),
                blocks=blocks or None,
                block_size=block_size,
                kv_cache_dtype=list(KV_CACHE_DTYPES)[dtype_code],
            )
        elif op == Op.PREFILL:
            runner.remote_prefill(*args[:2])
        elif op == Op.STEP:
            runner.remote_step(*args[:2])
        elif op == Op.CLEAR:
            runner.cache.clear()
        elif op == Op.STOP:
            return
        else:
            raise RuntimeError(f"unknown op {op}")


def _join(rank: int, world: int, store, spec: LoadSpec) -> TensorParallel:
    threads = torch.get_num_threads()
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # ranks share the cores: without this each would start one thread per core and they would spin
        # against each other at every all-reduce
        torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=FOREVER)
    comm = TensorParallel(rank, world, device, spec.all_reduce, store)
    comm.threads = threads
    return comm


def _worker_main(rank: int, world: int, port: int, spec: LoadSpec) -> None:
    # Ctrl-C reaches every process of the terminal's group: rank 0 decides (chat stops a reply, serve
    # shuts down and sends STOP); a rank that died of it would take rank 0 down with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=FOREVER)
    store.set(f"joined/{rank}", "ok")
    comm = _join(rank, world, store, spec)
    try:
        model = build_model(spec, comm)
    except Exception as err:
        store.set(f"ready/{rank}", f"{type(err).__name__}: {err}")
        raise
    store.set(f"ready/{rank}", "ok")
    serve_rank(model, comm)
    leave_group()
    os._exit(0)  # a spawned rank has nothing to flush; interpreter teardown could block on the group again


def leave_group(wait: float = 20.0) -> bool:
    """Leave the process group at the end, waiting at most `wait` seconds; False if it did not finish.

    With NCCL the group is aborted (nothing is in flight once STOP has been sent), gloo is destroyed.
    On two H200s both destroy_process_group and NCCL's abort once blocked rank 0 forever after a float16
    engine (cause not found); a close that never returns would hang chat's exit, so the wait is bounded
    and a group left behind is reported (a later model in the same process is then refused by start()).
    """

    def leave() -> None:
        with contextlib.suppress(Exception):
            if "nccl" in str(dist.get_backend()):
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()

    thread = threading.Thread(target=leave, daemon=True, name="leave-process-group")
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        log.warning("tensor parallelism: the process group did not close in %.0f s; left to process exit", wait)
        return False
    return True


def _wait_for(store, workers: list, stage: str) -> None:
    """Wait for every spawned rank's `stage/rank` key; fail with its message or when a rank dies."""
    deadline = time.monotonic() + START_TIMEOUT
    for rank, process in enumerate(workers, start=1):
        key = f"{stage}/{rank}"
        while not store.check([key]):
            if not process.is_alive():
                raise VicunaflowError(f"tensor-parallel rank {rank} exited (code {process.exitcode}) before {stage}")
            if time.monotonic() > deadline:
                raise VicunaflowError(f"tensor-parallel rank {rank}: not {stage} after {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        status = store.get(key).decode()
        if status != "ok":
            raise VicunaflowError(f"tensor-parallel rank {rank} failed to load its shard: {status}")


def _exit_if_a_rank_dies(comm: TensorParallel) -> None:
    """Rank 0: a rank that dies mid-service (out of memory, killed) would leave rank 0 waiting forever in
    its next collective, a server that accepts requests and never answers; exit instead, saying why."""
    while not comm.closed:
        for rank, process in enumerate(comm.workers, start=1):
            if not process.is_alive() and not comm.closed:
                log.critical(
                    "tensor-parallel rank %d exited (code %s); the model is incomplete, stopping",
                    rank,
                    process.exitcode,
                )
                logging.shutdown()
                os._exit(1)
        time.sleep(0.5)


def _exit_with_parent() -> None:
    """A spawned rank ends when rank 0's process goes away, even if it was killed without a STOP."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="watch-rank-0").start()
