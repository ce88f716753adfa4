"""HTTP for the downloads: resumable, retried, md5-verified fetches into a staging folder, with secrets
kept out of logs.

Shared by every source; httpx and rich are imported only when a download actually starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from vicunaflow import VicunaflowError, __version__
from vicunaflow.outputs import md5_file

# One logger for the package, so log lines name `vicunaflow.download` as before the split.
log = logging.getLogger("vicunaflow.download")

CHUNK = 1 << 20


def redact_url(url: str) -> str:
    """The URL without credentials, query string or fragment: safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Remote:
    """A release root: `url(path)` puts a file's path where the template has its `*`."""

    def __init__(self, template: str):
        self.template = template
        parts = urlsplit(template)
        secrets = [parts.query, parts.password, parts.username, *(value for _, value in parse_qsl(parts.query))]
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def url(self, path: str) -> str:
        return self.template.replace("*", quote(path), 1)

    def shown(self, path: str) -> str:
        return redact_url(self.template).replace("*", path, 1)


# ---- secrets stay out of logs and messages -------------------------------------------------------


class Redactor(logging.Filter):
    """Replaces known secrets in every log record and error message with `[redacted]`."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


@contextlib.contextmanager
def redacting(secrets: Iterable[str]) -> Iterator[Redactor]:
    """Redact `secrets` in everything logged (any logger) and in errors raised inside the block."""
    redactor = Redactor(secrets)
    # httpx logs every request URL (query string included) at INFO; we log our own, redacted lines.
    for name in ("httpx", "httpcore", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(redactor)
    try:
        yield redactor
    except VicunaflowError as err:
        # The same error, its text redacted: its type, and what it carries (HubUnavailable.problem), let callers
        # tell it apart, as a new VicunaflowError would not.
        err.args = tuple(redactor.redact(arg) if isinstance(arg, str) else arg for arg in err.args)
        for name, value in vars(err).items():
            if isinstance(value, str):
                setattr(err, name, redactor.redact(value))
        raise err from None
    finally:
        for handler in handlers:
            handler.removeFilter(redactor)


def redacted_command(secrets: list[str]) -> list[str]:
    redactor = Redactor(secrets)
    return [Path(sys.argv[0]).name, *(redactor.redact(arg) for arg in sys.argv[1:])]


# ---- HTTP: resumable, retried, verified downloads into the staging folder ------------------------


@dataclass(frozen=True)
class RemoteFile:
    path: str  # under the release root, e.g. "13B/consolidated.01.pth"
    md5: str | None  # None: in no checklist; fetched whole, never resumed

    @property
    def key(self) -> str:
        """Staging name: the expected md5, so a partial file can only ever continue the same content."""
        return self.md5 or "unverified-" + self.path.replace("/", "--")


class FetchFailed(VicunaflowError):
    """The server would not give a file: not found (HTTP 404), access denied (401, 403), or retries ran out
    (`status` None; `unreachable`: the last attempt could not connect at all).

    The message ends with download llama's way around it (the model size, Meta's signed URLs, `--source local
    --path DIR`); a verb without those (`eval download`) says its own after `problem`, rather than naming options
    it does not have.
    """

    def __init__(self, problem: str, hint: str, *, status: int | None = None, unreachable: bool = False) -> None:
        super().__init__(f"{problem}; {hint}")
        self.problem, self.status, self.unreachable = problem, status, unreachable


class Stopped(Exception):
    """Another file failed: stop early, keep the partial file for the next run."""


class Retryable(Exception):
    pass


class Fetcher:
    """One HTTP client shared by `jobs` threads; files land verified in `staging/<md5>`."""

    def __init__(self, remote: Remote, staging: Path, *, jobs: int, retries: int, retry_wait: float, timeout: float):
        import httpx

        self.remote, self.staging, self.jobs = remote, staging, max(1, jobs)
        self.retries, self.retry_wait = retries, retry_wait
        self.stop = threading.Event()
        self.staged: dict[str, Path] = {}
        self.client = httpx.Client(
            follow_redirects=True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(max_connections=self.jobs + 2),
            # identity: byte ranges must address the file's own bytes, not a compressed stream
            headers={"User-Agent": f"vicunaflow/{__version__}", "Accept-Encoding": "identity"},
        )

    def __enter__(self) -> Fetcher:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def fetch_bytes(self, path: str) -> bytes:
        """A small file (a checklist), fetched whole every time: it decides what the other files must be."""
        file = RemoteFile(path, None)
        staged = self.fetch(file, progress=None)
        try:
            return staged.read_bytes()
        finally:
            staged.unlink(missing_ok=True)
            (self.staging / f"{file.key}.lock").unlink(missing_ok=True)

    def fetch_all(self, files: list[RemoteFile]) -> None:
        """Fetch and verify every file in parallel; on the first failure stop the others (their partial
        files stay staged) and raise one error naming every failed file."""
        unique = list({f.key: f for f in files}.values())
        if not unique:
            return
        errors = []
        with _progress_bars() as progress, concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(self.fetch, f, progress): f for f in unique}
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        self.staged[futures[future].key] = future.result()
                    except Stopped:
                        pass
                    except VicunaflowError as err:
                        self.stop.set()
                        errors.append(str(err))
            except BaseException:  # Ctrl-C or a bug: the other threads stop at their next chunk
                self.stop.set()
                raise
        if errors:
            raise VicunaflowError("\n".join(errors))

    def fetch(self, file: RemoteFile, progress=None) -> Path:
        done = self.staging / file.key
        with _staging_lock(self.staging / f"{file.key}.lock", file.path):
            if file.md5 and done.exists():
                if md5_file(done) == file.md5:
                    log.info("%s: already fetched and verified in %s", file.path, done)
                    return done
                done.unlink()
            part = self.staging / f"{file.key}.part"
            if not file.md5:
                part.unlink(missing_ok=True)
            actual = self._download(file.path, part, progress)
            if file.md5 and actual != file.md5:
                aside = self._set_aside(part, file.path)
                raise VicunaflowError(
                    f"{file.path}: md5 mismatch: expected {file.md5}, got {actual} (from {self.remote.shown(file.path)}); "
                    f"kept aside as {aside}; nothing was written to the output folder"
                )
            part.rename(done)
            return done

    def _set_aside(self, part: Path, path: str) -> Path:
        aside = self.staging / "corrupt" / (path.replace("/", "--") + ".corrupt")
        aside.parent.mkdir(parents=True, exist_ok=True)
        part.replace(aside)
        return aside

    def _download(self, path: str, part: Path, progress) -> str:
        """Stream `path` into `part`, continuing what is there; return the md5 of the whole file."""
        import httpx

        url, shown = self.remote.url(path), self.remote.shown(path)
        digest, offset = hashlib.md5(), 0
        if part.exists():
            offset = part.stat().st_size
            with open(part, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
        task = progress.add_task(path, total=None, completed=offset) if progress else None
        started, start_offset, attempt = time.monotonic(), offset, 0
        while True:
            try:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                if offset:
                    log.info("%s: continuing from byte %d", path, offset)
                with self.client.stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status == 416 and offset:
                        # Nothing past our end: the partial file is complete (or longer than the remote one).
                        total = _content_range_total(response.headers.get("Content-Range", ""))
                        if total == offset:
                            break
                        digest, offset = hashlib.md5(), 0
                        part.unlink(missing_ok=True)
                        raise Retryable(f"partial file is longer than the remote file ({total} bytes); starting over")
                    _raise_for_status(status, shown)
                    if status == 206:
                        start = _content_range_start(response.headers.get("Content-Range", ""))
                        if start != offset:
                            digest, offset = hashlib.md5(), 0
                            part.unlink(missing_ok=True)
                            raise Retryable(f"server answered a different range ({start}); starting over")
                    elif offset:
                        log.warning("%s: the server ignores byte ranges; starting over", shown)
                        digest, offset = hashlib.md5(), 0
                    length = response.headers.get("Content-Length")
                    total = offset + int(length) if length and length.isdigit() else None
                    if progress:
                        progress.update(task, total=total, completed=offset)
                    with open(part, "ab" if offset else "wb") as f:
                        for chunk in response.iter_bytes(CHUNK):
                            if self.stop.is_set():
                                raise Stopped
                            f.write(chunk)
                            digest.update(chunk)
                            offset += len(chunk)
                            if progress:
                                progress.update(task, completed=offset)
                    if total is not None and offset != total:
                        raise Retryable(f"connection closed at byte {offset} of {total}")
                break
            except (Retryable, httpx.TransportError) as err:
                attempt += 1
                reason = str(err) or type(err).__name__
                if attempt > self.retries:
                    raise FetchFailed(
                        f"{shown}: failed after {self.retries} retries ({reason})",
                        "check the network and the URL, or fetch the files another way and use --source local --path DIR",
                        unreachable=isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)),
                    ) from None
                wait = min(self.retry_wait * 2 ** (attempt - 1), 60.0)
                log.warning("%s: %s; retry %d/%d in %.1fs", path, reason, attempt, self.retries, wait)
                if self.stop.wait(wait):
                    raise Stopped from None
        seconds = time.monotonic() - started
        log.info(
            "%s: %.1f MB fetched in %.1fs (%.1f MB/s)",
            path,
            (offset - start_offset) / 1e6,
            seconds,
            (offset - start_offset) / 1e6 / max(seconds, 1e-6),
        )
        return digest.hexdigest()


def _raise_for_status(status: int, shown: str) -> None:
    if status in (200, 206):
        return
    # The hints are download llama's; eval download replaces them (FetchFailed.problem).
    if status == 404:
        raise FetchFailed(
            f"{shown}: not found (HTTP 404)",
            "check the URL and the model size, or use --source local --path DIR with files you already have",
            status=status,
        )
    if status in (401, 403):
        raise FetchFailed(
            f"{shown}: access denied (HTTP {status})",
            "Meta's signed URLs expire after a day and allow few downloads: request a new one, "
            "or use --source local --path DIR",
            status=status,
        )
    if status in (408, 429) or status >= 500:
        raise Retryable(f"HTTP {status}")
    raise VicunaflowError(f"{shown}: unexpected HTTP {status}")


def _content_range_start(value: str) -> int | None:
    match = re.match(r"bytes (\d+)-", value)
    return int(match.group(1)) if match else None


def _content_range_total(value: str) -> int | None:
    match = re.search(r"/(\d+)$", value)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def _staging_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Two processes must not append to the same partial file."""
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VicunaflowError(f"{what}: another vicunaflow process is downloading it ({lock_path})") from None
        yield


@contextlib.contextmanager
def _progress_bars() -> Iterator:
    """rich progress bars on a terminal; in Snakemake's log files one line per finished file instead."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    )
    with progress:
        yield progress


# ---- putting files in place without a second copy ---------------------------------------------


def place_file(src: Path, dst: Path, mode: Literal["hardlink-or-copy", "hardlink-or-symlink", "copy"]) -> str:
    """Put `src` at `dst` without a second copy where the file system allows; returns what was done."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode != "copy":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
        if mode == "hardlink-or-symlink":
            dst.symlink_to(src.resolve())
            return "symlink"
    shutil.copyfile(src, dst)
    return "copy"
