"""`serve --engine-process`: each model's engine in a process of its own, the HTTP side in the server's.

Why: in one process the event loop (reading requests, rendering prompts, writing every stream's events) and
the engine thread (launching each forward's kernels) take turns at one GIL. On an H200 (7B, 64 streams of
128-token prompts through the API) the burst of requests reached the engine over 40-65 ms while the prefill
forward running meanwhile took 20-30 ms longer than alone, and the API ran at 95% of the engine alone's rate
(docs/benchmarks.md, "twenty-third session"). vLLM's V1 runs its engine core in a process of its own for the
same reason.

The server process keeps the tokenizer (prompts are rendered and tokenized there, as before) and a
`RemoteEngine` with the methods the app calls on an `Engine`. The child loads the model, runs an `Engine`, and
answers over a pipe: requests in; events out, one message for each piece of the engine's work that emits them
(a prefill forward's first tokens, a decode step's tokens: `Engine.flush_events`), which a reader thread here
hands to the requests' sinks. The child follows the server: it stops when told (the server's graceful shutdown),
when the pipe closes, or when the server's process is gone (checked even while it loads); if the child dies,
every open request ends with an error and /health reports the failure, as when an engine's loop stops on an error.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker
from pathlib import Path
from types import SimpleNamespace

from vicunaflow import VicunaflowError
from vicunaflow.engine.sampling import SamplingParams
from vicunaflow.engine.scheduler import Event, check_prompt, reply_room
from vicunaflow.loading import ModelOptions

log = logging.getLogger(__name__)

CALLS = ("snapshot_stats", "snapshot_latency")  # what the app reads of an engine besides its events
CALL_TIMEOUT_S = 5.0  # /health and /metrics wait this long for the child (in a worker thread, not the event loop)
STOP_TIMEOUT_S = 60.0
PARENT_POLL_S = 0.5  # how often the child checks that the server still lives


class RemoteRequest:
    """The server's side of a request running in the engine process: what the app reads of a `Request`."""

    def __init__(self, engine: RemoteEngine, request_id: int, sink: Callable[[Event], None]):
        self.engine, self.id, self.sink = engine, request_id, sink
        self.done = False
        self.cancelled = False
        self.completion_tokens = 0

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (e.g. the client disconnected)."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        with contextlib.suppress(OSError, ValueError):  # the engine process is gone: nothing to cancel there
            self.engine._send(("cancel", self.id))


class RemoteEngine:
    """An `Engine` in a child process, for the app: tokenizer, context, submit, max_new_tokens, the snapshots.

    Starting blocks until the child has loaded the model and warmed up (or failed: its error is raised here); with
    wait=False it returns once the child is started, and `open_tokenizer()` and `wait_ready()` follow
    (start_engines).
    fit: serve.fit.check_fit's (estimates, device, num_gpus), checked in the child before it loads (so that this
    process never opens a CUDA context of its own, ~0.5 GiB of the GPU). hold: the child imports, then waits for
    `release()` before it loads. warm_lock: a spawn-context Lock the child holds while its engine warms up, shared
    by engines on one GPU. Use it as a context manager, or call `stop()`.
    """

    def __init__(
        self,
        model_path: Path,
        model_options: ModelOptions,
        engine_options: dict,
        fit=None,
        name: str = "engine",
        wait: bool = True,
        hold: bool = False,
        warm_lock=None,
    ):
        self.name, self.model_path = name, Path(model_path)
        self.failure: str | None = None
        self._requests: dict[int, RemoteRequest] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._replies: dict[int, list] = {}  # call id -> [threading.Event, value]
        self._lock = threading.Lock()  # _requests against the reader's last sweep
        self.stopped = False  # the reader has ended every request it knew: no submit may enter after it
        self._last: dict[str, dict] = {}  # the snapshots last read: what /health shows once the child is gone
        self._stopping = False  # stop() asked the child to stop: its "stopped" is no failure
        self._reader: threading.Thread | None = None  # started once the child is ready
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; the child imports afresh
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_engine_main,
            args=(
                child_end,
                self.model_path,
                model_options,
                engine_options,
                fit,
                hold,
                warm_lock,
                sys.getswitchinterval(),
            ),
            name=f"vicunaflow-{name}",
        )
        log.info("%s: starting its engine process", name)
        # SIGINT blocked while the child starts (it inherits the mask): a Ctrl-C before it ignores SIGINT, while it
        # imports, would otherwise print its traceback; the server stops it either way. The resource tracker first:
        # starting it unblocks SIGINT in this thread.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_end.close()  # this end lives in the child: its exit then closes the pipe for recv() here
        self._fitting = fit is not None  # its "fitted" still to come, before "ready"
        if wait:
            self.open_tokenizer()
            self.wait_ready()

    def open_tokenizer(self) -> None:
        """The tokenizer here too (prompts are tokenized on the HTTP side), opened while the child loads."""
        from vicunaflow.tokenizer import open_tokenizer

        try:
            self.tokenizer = open_tokenizer(self.model_path)
        except BaseException:  # a damaged tokenizer, Ctrl-C while loading: the child must not outlive this
            self._terminate()
            raise

    def wait_fitted(self) -> None:
        """Block until the child has checked the fit (the memory of every model in `fit`); its error if not."""
        if self._fitting:
            try:
                self._expect("fitted")
            except BaseException:
                self._terminate()
                raise
            self._fitting = False

    def release(self) -> None:
        """Let a child started with hold=True check nothing and load (another has checked that all fit)."""
        with contextlib.suppress(OSError, ValueError):  # it died meanwhile: wait_ready says so
            self._send(("go",))

    def wait_ready(self) -> None:
        """Block until the child has loaded the model and warmed up; its error (naming the model) if it failed."""
        self.wait_fitted()
        try:
            info = self._expect("ready")
        except BaseException:
            self._terminate()
            raise
        # engine.model as the app reads it: its ModelArgs (the vocabulary a token-id prompt is checked against)
        self.context, self.model = info["context"], SimpleNamespace(args=info["args"])
        self._reader = threading.Thread(target=self._read, name=f"vicunaflow-{self.name}-events", daemon=True)
        self._reader.start()
        try:
            for call in CALLS:  # a first reading of each, for /health should the child ever die
                self._call(call)
        except BaseException:
            self.stop()
            raise

    def _expect(self, expected: str):
        """The child's next message, which must be `expected` (its value); else the child's failure, raised."""
        try:
            kind, *message = self._conn.recv()
        except (EOFError, OSError):
            kind, message = "failed", [f"the engine process exited with code {self._wait_exit()} while loading"]
        if kind != expected:
            self._wait_exit()
            raise VicunaflowError(f"{self.model_path}: {message[0]}")
        return message[0] if message else None

    def _terminate(self) -> None:
        """End a child that is not serving yet (still loading): there is no pipe loop to tell."""
        self._process.terminate()
        self._wait_exit()
        self._conn.close()

    # -- what the app calls -------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]) -> RemoteRequest:
        """Engine.submit's checks here (its errors at once), the request itself in the child."""
        check_prompt(prompt_ids, self.context)
        if self.failure is not None:
            raise VicunaflowError(f"the engine stopped after an error: {self.failure}")
        request = RemoteRequest(self, next(self._ids), sink)
        with self._lock:
            if self.stopped:  # the reader's last sweep is done: this request's end would never come
                raise VicunaflowError(f"the engine stopped: {self.failure or 'the server is shutting down'}")
            self._requests[request.id] = request
        try:
            self._send(("submit", request.id, list(prompt_ids), params))
        except (OSError, ValueError) as err:
            self._requests.pop(request.id, None)
            raise VicunaflowError(f"the engine process is gone: {err}") from None
        return request

    def max_new_tokens(self, prompt_length: int, requested: int | None) -> int:
        return reply_room(self.context, prompt_length, requested)

    def snapshot_stats(self) -> dict:
        return self._call("snapshot_stats") | ({"failure": self.failure} if self.failure else {})

    def snapshot_latency(self) -> dict[str, dict]:
        return self._call("snapshot_latency")

    # -- lifetime -----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the child's engine (its open requests end "cancelled") and wait for the child to exit. Once: the
        server calls it as it shuts down, and again as serve() unwinds."""
        if self._stopping:
            return
        self._stopping = True
        if self._reader is None:  # still loading (another model's engine failed, or Ctrl-C): nothing to wind down
            self._terminate()
            return
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("%s: the engine process did not stop within %.0f s: terminated", self.name, STOP_TIMEOUT_S)
            self._process.terminate()
            self._process.join(10)
        self._reader.join(10)
        self._conn.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the pipe -------------------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _call(self, name: str) -> dict:
        """A snapshot from the child; the last one read once the child is gone (with `failure` set)."""
        if self.failure is None:
            call_id = next(self._ids)
            slot = self._replies[call_id] = [threading.Event(), None]
            try:
                self._send(("call", call_id, name))
                if slot[0].wait(CALL_TIMEOUT_S) and slot[1] is not None:
                    self._last[name] = slot[1]
            except (OSError, ValueError):
                pass  # the reader thread records why
            finally:
                self._replies.pop(call_id, None)
        if name not in self._last:
            raise VicunaflowError(f"{self.name}: no answer from the engine process ({self.failure or 'timed out'})")
        return self._last[name]

    def _read(self) -> None:
        """The reader thread: each message's events to their requests' sinks, answers to their callers."""
        try:
            while True:
                kind, *message = self._conn.recv()
                if kind == "events":
                    batch, failure = message
                    if failure and self.failure is None:
                        self.failure = failure
                    for request_id, event in batch:
                        self._deliver(request_id, event)
                elif kind == "reply":
                    call_id, value = message
                    slot = self._replies.get(call_id)
                    if slot is not None:
                        slot[1] = value
                        slot[0].set()
                elif kind == "stopped":
                    if not self._stopping:  # it stopped on its own: its log says why
                        self.failure = self.failure or "the engine process stopped on its own"
                    return
        except (EOFError, OSError):
            if self.failure is None:
                self.failure = "the engine process exited unexpectedly"  # at once: no submit may wait on it now
                self.failure += f" (exit code {self._wait_exit(timeout=5)})"
            log.error("%s: %s", self.name, self.failure)
        except Exception as err:  # a bug here: no event would ever reach a request again, so say so
            self.failure = self.failure or f"reading the engine process failed: {type(err).__name__}: {err}"
            log.exception("%s: reading the engine process failed", self.name)
        finally:
            with self._lock:
                self.stopped = True
                slots, open_requests = list(self._replies.values()), list(self._requests)
            for slot in slots:
                slot[0].set()
            for request_id in open_requests:
                self._deliver(request_id, Event("", finish_reason="error", error=self.failure or "the engine stopped"))

    def _deliver(self, request_id: int, event: Event) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        request.completion_tokens = event.completion_tokens or request.completion_tokens
        if event.finish_reason is not None:
            request.done = True
            del self._requests[request_id]
        try:
            request.sink(event)
        except Exception:  # the consumer's fault, as in the engine: end its request, not the others
            log.exception("request %d: its event handler failed; the request is cancelled", request_id)
            request.cancel()

    def _wait_exit(self, timeout: float = 30) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode


def start_engines(
    models: dict[str, Path], model_options: ModelOptions, engine_options: dict, fit, stack: contextlib.ExitStack
) -> dict[str, RemoteEngine]:
    """Each model's engine process, all loading and warming up at once; they enter `stack` (which stops them).

    All start at once; the first checks that every model fits (fit: check_fit's estimates of all of them, device,
    num_gpus) while the others import, and they load once it has, so none allocates before the check. The
    warm-ups take turns (the autotuner times kernels: beside another engine's warm-up on the same GPU it would
    pick by skewed times, for good), the later ones finding the first's compiled kernels in Triton's cache. Each
    is waited for as it gets ready, so the first to fail is raised at once (naming its model) and the stack ends
    the others. Two 7B models on an H200 (a fresh Triton cache) served after 66.6 s, against 75.5 s one after
    another (docs/benchmarks.md, "twenty-fifth session").
    """
    engines = {}
    warm_lock = multiprocessing.get_context("spawn").Lock()
    for i, (name, path) in enumerate(models.items()):
        first = i == 0
        remote = RemoteEngine(
            path,
            model_options,
            engine_options,
            fit if first else None,
            name=name,
            wait=False,
            hold=not first,
            warm_lock=warm_lock,
        )
        engines[name] = stack.enter_context(remote)
    for engine in engines.values():  # the server's first import of the tokenizer's libraries takes seconds
        engine.open_tokenizer()
    first, *others = engines.values()
    first.wait_fitted()
    for engine in others:
        engine.release()
    loading = {engine._conn: engine for engine in engines.values()}
    while loading:
        for conn in multiprocessing.connection.wait(list(loading)):
            loading.pop(conn).wait_ready()
    return engines


# -- the child --------------------------------------------------------------------------------------------------


class _Outbox:
    """Events from the engine thread, sent as one message per flush by a sender thread (so that
    pickling and writing the pipe never hold up the engine's next launch)."""

    def __init__(self, send: Callable[[tuple], None], engine):
        self.send, self.engine = send, engine
        self.ready = threading.Condition()
        self.pending: list[tuple[int, Event]] = []
        self.batch: list[tuple[int, Event]] = []
        self.closed = False

    def post(self, request_id: int, event: Event) -> None:
        """Engine thread: a request's event, kept until the engine flushes."""
        self.pending.append((request_id, event))

    def flush(self) -> None:
        """Engine thread (Engine.flush_events): hand the events so far to the sender."""
        if self.pending:
            with self.ready:
                self.batch += self.pending
                self.ready.notify()
            self.pending = []

    def run(self) -> None:
        while True:
            with self.ready:
                while not self.batch and not self.closed:
                    self.ready.wait()
                if not self.batch:
                    return
                batch, self.batch = self.batch, []
            try:
                self.send(("events", batch, self.engine.failure))
            except (OSError, ValueError):
                return  # the server is gone: the main thread sees the pipe closed and stops the engine

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()


def _engine_main(
    conn, model_path: Path, model_options: ModelOptions, engine_options: dict, fit, hold: bool, warm_lock, switch: float
) -> None:
    """The engine process: check the fit (or, held, wait until another has), load, warm up, say ready, then serve the
    pipe until told to stop or it closes."""
    from vicunaflow.engine import Engine
    from vicunaflow.log import setup_logging
    from vicunaflow.serve import heap
    from vicunaflow.serve.fit import check_fit

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops this one
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since the server started it (ignored now)
    setup_logging()
    log.info("engine process %d: Python and its imports are up (the time since the server's 'starting')", os.getpid())
    threading.Thread(target=_follow_parent, args=(os.getppid(),), name="vicunaflow-parent-watch", daemon=True).start()
    sys.setswitchinterval(switch)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    if hold:
        try:
            conn.recv()  # ("go",): another model's engine process found that all of them fit
        except (EOFError, OSError):  # the server stopped it before
            return
    try:
        if fit is not None:
            check_fit(fit[0], device=fit[1], num_gpus=fit[2])
            send(("fitted", None))  # the other models' engine processes may allocate now (start_engines)
        model, tokenizer = model_options.load(model_path)
        with warm_lock or contextlib.nullcontext():  # one engine warms up at a time (start_engines says why)
            engine = Engine(model, tokenizer, **engine_options)
    except BaseException as err:  # the server raises it, naming the model
        if not isinstance(err, VicunaflowError):  # a bug, not the user's input: its traceback goes to the log
            log.exception("the engine process failed to start")
        send(("failed", str(err) if isinstance(err, VicunaflowError) else f"{type(err).__name__}: {err}"))
        return
    # the collections here (each holds up the engine's loop) for /health, as the server counts its own
    with contextlib.closing(model), heap.GCPauses() as pauses:
        outbox = _Outbox(send, engine)
        sender = threading.Thread(target=outbox.run, name="vicunaflow-engine-sender", daemon=True)
        sender.start()
        engine.flush_events = outbox.flush
        requests = {}
        engine.start()
        heap.freeze()  # the model and the engine live as long as this process (serve/heap.py)
        calls = {
            "snapshot_stats": lambda: engine.snapshot_stats() | {"gc": pauses.snapshot()},
            "snapshot_latency": engine.snapshot_latency,
        }
        send(("ready", {"context": engine.context, "args": model.args}))
        try:
            _serve_pipe(conn, engine, outbox, calls, requests, send)
        finally:
            engine.stop()  # the requests still open end "cancelled" (sent by the engine's last flush)
            outbox.close()
            sender.join(STOP_TIMEOUT_S)
            with contextlib.suppress(OSError, ValueError):
                send(("stopped",))


def _follow_parent(parent: int) -> None:
    """Exit as soon as the server is gone, whatever this process is doing (loading a model, warming up): a
    server killed outright (SIGKILL, or SIGTERM before it serves) cannot stop it, and the GPU memory it holds
    must come back for the next server."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _serve_pipe(conn, engine, outbox: _Outbox, calls: dict, requests: dict, send: Callable[[tuple], None]) -> None:
    """The child's main thread: submits, cancels and snapshot calls (`calls`: CALLS by name) until "stop" or the
    pipe closes."""

    def sink_for(request_id: int) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if event.finish_reason is not None:
                requests.pop(request_id, None)
            outbox.post(request_id, event)

        return sink

    while True:
        try:
            kind, *message = conn.recv()
        except (EOFError, OSError):
            log.warning("the server closed the engine's pipe: stopping")
            return
        if kind == "stop":
            return
        try:
            _handle(kind, message, engine, calls, requests, sink_for, send)
        except OSError:  # the reply could not be written (a ValueError from the engine is a failed message below)
            log.warning("the server closed the engine's pipe: stopping")
            return
        except Exception:  # one message's failure (a bug) must not take the engine down with it
            log.exception("the engine process failed to handle a %r message", kind)


def _handle(
    kind: str, message: list, engine, calls: dict, requests: dict, sink_for, send: Callable[[tuple], None]
) -> None:
    if kind == "submit":
        request_id, prompt_ids, params = message
        try:
            request = requests[request_id] = engine.submit(prompt_ids, params, sink_for(request_id))
        except Exception as err:  # the engine stopped after an error (the server checked the rest)
            send(("events", [(request_id, Event("", finish_reason="error", error=str(err)))], engine.failure))
            return
        if request.done:  # it ended before it was entered: its sink found nothing to forget
            requests.pop(request_id, None)
    elif kind == "cancel":
        request = requests.get(message[0])
        if request is not None:
            request.cancel()
    elif kind == "call":
        call_id, name = message
        value = None
        try:
            value = calls[name]() if name in calls else None
        finally:  # None on a failure: the caller keeps its last reading rather than waiting out its timeout
            send(("reply", call_id, value))
