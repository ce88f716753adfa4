"""A `vicunaflow serve` child process for the duration of a block: the judge's model, or lm-eval's.

Its own module so that judge, harness and summary import it without importing each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from vicunaflow import VicunaflowError
from vicunaflow.outputs import unwound_by_sigterm

log = logging.getLogger(__name__)


@contextlib.contextmanager
def served(
    model_path: Path, model_name: str, timeout: float, serve_args: Sequence[str] = (), what: str = "the judge"
) -> Iterator[str]:
    """Start `vicunaflow serve` of `model_path` on a free local port; yield its v1 root once /health answers.

    The server is stopped when the block ends, whatever ends it: an error, Ctrl-C, or a SIGTERM to this
    process (Snakemake and SLURM cancel jobs that way), which raises `Terminated` here while it runs.
    `serve_args` go to `vicunaflow serve` as they are (--max-context N, --device cuda, ...).
    """
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vicunaflow", "serve", "--model-path", str(model_path)]
    command += ["--port", str(port), "--model-name", model_name, *serve_args]
    env = {k: v for k, v in os.environ.items() if k != "VICUNAFLOW_API_KEYS"}  # local and keyless
    log.info("starting %s: %s", what, " ".join(command))
    with unwound_by_sigterm():
        process = subprocess.Popen(command, env=env)
        root = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise VicunaflowError(
                        f"{what}'s server ({model_path}) exited with code {process.returncode}; see its log above"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise VicunaflowError(f"{what}'s server ({model_path}) did not answer within {timeout:.0f}s")
                time.sleep(0.5)
            log.info("%s: %s serving %s at %s/v1 (pid %d)", what, model_name, model_path, root, process.pid)
            yield f"{root}/v1"
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("%s's server (pid %d) stopped", what, process.pid)
