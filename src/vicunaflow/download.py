"""Weights in: raw LLaMA checkpoints (a pyllama mirror, Meta's signed URL, a local copy) and Hugging Face repos.

Why our own downloader: the weights are tens of gigabytes over slow links, and pyllama's downloader
restarts by hand, keeps going after a failed md5 and exits 0. Here every file is checked against its
md5 checklist before it reaches an output folder. Partial files live in a staging folder outside
Snakemake's outputs (`.staging/` by default), keyed by their expected md5, so a failed job never
deletes what was fetched and a rerun continues them with HTTP Range requests. Dropped connections
and 5xx answers are retried with exponential backoff; files download in parallel. A file that fails
its checksum is set aside as `*.corrupt` (a name no later step reads) and the command exits non-zero.
Signed-URL query strings, credentials and tokens are never printed.

Layout written (pyllama's): `<folder>/tokenizer.model`, `<folder>/tokenizer_checklist.chk` (shared by
all sizes, its own Snakemake rule: `--model-size tokenizer`), and `<folder>/<SIZE>/{params.json,
checklist.chk, consolidated.NN.pth, vicunaflow.json}`, each size folder renamed into place whole.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from vicunaflow import VicunaflowError, __version__
from vicunaflow.outputs import atomic_output_dir, atomic_write_bytes, md5_file, sha256_file, write_manifest
from vicunaflow.sizes import RAW_DIR_TO_SIZE, get_size

log = logging.getLogger(__name__)

PYLLAMA_MIRROR = "https://agi.gpt4.org/llama/LLaMA"  # pyllama's community mirror (its LLAMA_URL)
TOKENIZER = "tokenizer"  # the --model-size value that asks for the shared tokenizer alone
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"
CHECKLIST = "checklist.chk"
# Llama 2 as Meta's download.sh names its folders (7B -> llama-2-7b, ...), with their shard counts.
LLAMA2_SHARDS = {
    "llama-2-7b": 1,
    "llama-2-7b-chat": 1,
    "llama-2-13b": 2,
    "llama-2-13b-chat": 2,
    "llama-2-70b": 8,
    "llama-2-70b-chat": 8,
}
LLAMA2_LICENSE_FILES = ("LICENSE", "USE_POLICY.md")  # at the root of Meta's Llama 2 URL, not in any checklist
SHARD_NAME = re.compile(r"^consolidated\.(\d{2})\.pth$")
CHUNK = 1 << 20


def download_llama(
    *,
    model_size: str = "7B",
    folder: Path = Path("pyllama_data"),
    source: Literal["pyllama", "meta", "local"] = "pyllama",
    base_url: str | None = None,
    url: str | None = None,
    url_env: str = "LLAMA_SIGNED_URL",
    path: Path | None = None,
    link: bool = True,
    include_tokenizer: bool = True,
    staging_dir: Path = Path(".staging"),
    jobs: int = 4,
    retries: int = 8,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Fetch raw LLaMA checkpoints in pyllama's layout, every file verified against its md5 checklist.

    Arguments:
        model_size: comma-separated sizes: 7B,13B,30B,65B (or 7b,13b,33b,65b), tiny, Llama 2 as
            llama-2-7b, llama-2-13b, llama-2-70b (and -chat); `tokenizer` alone fetches only the
            shared tokenizer.model and tokenizer_checklist.chk.
        folder: pyllama's download folder; sizes go to `<folder>/<SIZE>/`, the tokenizer to its root.
        source: pyllama: a mirror of pyllama's layout (--base-url); meta: Meta's signed URL from its
            e-mail (`*` stands for each file's path); local: an existing copy (--path), verified then linked.
        base_url: root URL of the pyllama-layout mirror; default: pyllama's community mirror.
        url: Meta's signed URL; better left out and passed in the environment variable `url_env`,
            so it never shows in process lists or Snakemake logs.
        url_env: environment variable holding Meta's signed URL.
        path: for source local: a pyllama-layout folder (holding <SIZE>/) or one size folder.
        link: for source local: hard-link (or, across file systems, symlink) the verified files
            instead of copying them.
        include_tokenizer: also fetch the tokenizer: to the folder root (pyllama, meta), or into the
            size folder (local: that rule owns only the size folder).
        staging_dir: partial and verified-but-not-placed files, outside any workflow output; a rerun
            continues from here.
        jobs: files downloaded (or verified) in parallel.
        retries: attempts per file after a dropped connection, timeout or 5xx, with exponential backoff.
        retry_wait: seconds before the first retry; doubled each time, at most 60.
        timeout: seconds without data before a connection counts as dropped.
    """
    want_tokenizer_only, dirs = parse_model_sizes(model_size)
    folder, staging_dir = Path(folder), Path(staging_dir)
    if source == "local":
        return _llama_from_local(
            Path(path) if path else None, dirs, want_tokenizer_only, folder, link, include_tokenizer, jobs
        )

    template = _url_template(source, base_url, url, url_env)
    remote = Remote(template)
    with redacting(remote.secrets):
        log.info(
            "download llama: sizes %s%s from %s (source %s) into %s; staging %s; %d parallel, %d retries",
            ", ".join(dirs) or "-",
            " + tokenizer" if include_tokenizer or want_tokenizer_only else "",
            remote.shown("*"),
            source,
            folder,
            staging_dir,
            jobs,
            retries,
        )
        with Fetcher(
            remote, staging_dir / "llama", jobs=jobs, retries=retries, retry_wait=retry_wait, timeout=timeout
        ) as fetcher:
            plans = []
            if include_tokenizer or want_tokenizer_only:
                plans.append(_tokenizer_plan(fetcher, folder))
            for name in dirs:
                plans.append(_size_plan(fetcher, name, folder / name, llama2_extras=source == "meta"))
            todo = [plan for plan in plans if not plan.already_done()]
            fetcher.fetch_all([f for plan in todo for f in plan.files])
            for number, plan in enumerate(todo):
                plan.finish(fetcher, remote)
                # Staged files are dropped once placed, unless a later output takes the same bytes.
                later = {f.key for other in todo[number + 1 :] for f in other.files}
                _drop_staged(fetcher, [f for f in plan.files if f.key not in later])
    return folder / dirs[0] if dirs else folder


def download_hf(
    *,
    repo: str | None = None,
    local_dir: Path,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    repo_type: Literal["model", "dataset"] = "model",
    source: Literal["hf", "local"] = "hf",
    path: Path | None = None,
    link: bool = True,
    token_env: str = "HF_TOKEN",
    endpoint: str | None = None,
    staging_dir: Path = Path(".staging"),
    jobs: int = 4,
) -> Path:
    """Fetch a Hugging Face repository at a pinned revision, verify every file, record the commit fetched.

    Used for the Vicuna deltas (lmsys/vicuna-7b-delta-v1.1), pre-converted bases (huggyllama/llama-7b)
    and merged releases (lmsys/vicuna-7b-v1.5). `<local_dir>/vicunaflow.json` records the repository,
    the commit actually fetched and each file's hash. With HF_HUB_OFFLINE=1 the files come from the
    Hugging Face cache (~/.cache/huggingface/hub), without any network access.

    Arguments:
        repo: repository id, e.g. lmsys/vicuna-7b-delta-v1.1 (source hf).
        local_dir: output folder; written whole or not at all.
        revision: branch, tag or commit to fetch; default: the repository's main branch.
        include: glob patterns of files to fetch, as a list: --include '["*.json", "*.bin"]' or
            repeated --include+ PATTERN; default: all files.
        exclude: glob patterns of files to skip (same form).
        repo_type: model or dataset repository.
        source: hf: the Hub (or --endpoint); local: an existing folder (--path), checked then linked.
        path: for source local: the folder to take.
        link: for source local: hard-link (or symlink) instead of copying.
        token_env: environment variable holding a Hub token for gated or private repos; without it,
            huggingface_hub's own login (`hf auth login`, HF_TOKEN) is used. Never printed.
        endpoint: Hub URL; default: $HF_ENDPOINT or https://huggingface.co.
        staging_dir: partial downloads, outside any workflow output; a rerun continues from here.
        jobs: files downloaded in parallel.
    """
    local_dir, staging_dir = Path(local_dir), Path(staging_dir)
    if source == "local":
        return _hf_from_local(Path(path) if path else None, local_dir, link)
    if not repo:
        raise VicunaflowError("download hf: --repo is required with --source hf (e.g. lmsys/vicuna-7b-delta-v1.1)")
    token = os.environ.get(token_env) or None
    with redacting([token] if token else []):
        return _hf_from_hub(
            repo, local_dir, revision, include, exclude, repo_type, token, token_env, endpoint, staging_dir, jobs
        )


# ---- model sizes and URLs ----------------------------------------------------------------------


def parse_model_sizes(model_size: str) -> tuple[bool, list[str]]:
    """`7B,13b,llama-2-7b,tokenizer` -> (tokenizer asked for, folder names ["7B", "13B", "llama-2-7b"])."""
    tokenizer, dirs = False, []
    for item in (part.strip() for part in str(model_size).split(",")):
        if not item:
            continue
        if item.lower() == TOKENIZER:
            tokenizer = True
            continue
        if item.lower() in LLAMA2_SHARDS:
            name = item.lower()
        else:
            try:
                name = get_size(item).raw_dir
            except ValueError:
                known = ", ".join([*RAW_DIR_TO_SIZE, *LLAMA2_SHARDS, TOKENIZER])
                raise VicunaflowError(f"--model-size: unknown size {item!r}; known: {known}") from None
        if name not in dirs:
            dirs.append(name)
    if not tokenizer and not dirs:
        raise VicunaflowError("--model-size: no size given (e.g. 7B, 13B,30B, llama-2-7b, or tokenizer)")
    return tokenizer, dirs


def _url_template(source: str, base_url: str | None, url: str | None, url_env: str) -> str:
    """A URL with one `*` that stands for a file's path under the release root."""
    if source == "meta":
        url = url or os.environ.get(url_env)
        if not url:
            raise VicunaflowError(
                f"--source meta needs Meta's signed URL: put it in the environment variable {url_env} "
                "(or pass --url); or use --source local --path DIR with files you already have"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.path.count("*") != 1:
            raise VicunaflowError(
                f"signed URL {redact_url(url)}: expected an http(s) URL with one '*' in its path, "
                "as in Meta's e-mail (https://download.llamameta.net/*?Policy=...)"
            )
        return url
    parts = urlsplit(base_url or PYLLAMA_MIRROR)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise VicunaflowError(
            f"--base-url {redact_url(base_url or '')}: expected an http(s) URL of a pyllama-layout mirror"
        )
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/*", parts.query, ""))


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
        raise VicunaflowError(redactor.redact(str(err))) from None
    finally:
        for handler in handlers:
            handler.removeFilter(redactor)


# ---- checklists and safe names -------------------------------------------------------------------


def parse_checklist(text: str, where: str) -> dict[str, str]:
    """`md5sum` output -> {file name: md5}; names must be plain file names inside the folder."""
    entries = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{32}) [ *](.+)", line.rstrip("\r"))
        if not match:
            raise VicunaflowError(f"{where}: line {number} is not an md5sum line ('<md5>  <file>'): {line[:80]!r}")
        name = safe_name(match.group(2).strip(), where)
        entries[name] = match.group(1).lower()
    if not entries:
        raise VicunaflowError(f"{where}: the checklist is empty")
    return entries


def safe_name(name: str, where: str) -> str:
    """Refuse names that would write outside the target folder (absolute, `..`, subfolders)."""
    name = name.removeprefix("./")
    pure = PurePosixPath(name)
    if (
        not name
        or pure.is_absolute()
        or "\\" in name
        or re.match(r"^[A-Za-z]:", name)
        or len(pure.parts) != 1
        or pure.parts[0] in (".", "..")
        or "\0" in name
    ):
        raise VicunaflowError(
            f"{where}: refusing entry {name!r}: checklist entries must be plain file names inside the folder"
        )
    return name


def _inside(folder: Path, name: str) -> Path:
    target = (folder / name).resolve()
    if target.parent != folder.resolve():
        raise VicunaflowError(f"{folder}: refusing {name!r}: it would be written outside the folder")
    return folder / name


def _check_shards(name: str, entries: dict[str, str], where: str) -> None:
    """The shard count comes from the checklist; it must be 00..N-1 and is compared with the known size."""
    shards = sorted(int(m.group(1)) for n in entries if (m := SHARD_NAME.match(n)))
    if not shards:
        raise VicunaflowError(f"{where}: lists no consolidated.NN.pth file; is this a raw LLaMA checkpoint folder?")
    if shards != list(range(len(shards))):
        raise VicunaflowError(f"{where}: shards {shards} are not numbered 00..{len(shards) - 1:02d}; a file is missing")
    expected = LLAMA2_SHARDS.get(name) or (get_size(name).shards if name in RAW_DIR_TO_SIZE else None)
    if expected and expected != len(shards):
        log.warning("%s: %d shards listed; the %s release has %d", where, len(shards), name, expected)


# ---- HTTP: resumable, retried, verified downloads into the staging folder ------------------------


@dataclass(frozen=True)
class RemoteFile:
    path: str  # under the release root, e.g. "13B/consolidated.01.pth"
    md5: str | None  # None: in no checklist; fetched whole, never resumed

    @property
    def key(self) -> str:
        """Staging name: the expected md5, so a partial file can only ever continue the same content."""
        return self.md5 or "unverified-" + self.path.replace("/", "--")


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
                    raise VicunaflowError(
                        f"{shown}: failed after {self.retries} retries ({reason}); check the network and the URL, "
                        "or fetch the files another way and use --source local --path DIR"
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
    if status == 404:
        raise VicunaflowError(
            f"{shown}: not found (HTTP 404); check the URL and the model size, "
            "or use --source local --path DIR with files you already have"
        )
    if status in (401, 403):
        raise VicunaflowError(
            f"{shown}: access denied (HTTP {status}); Meta's signed URLs expire after a day and allow few "
            "downloads: request a new one, or use --source local --path DIR"
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


# ---- plans: what each output needs, and how it is put in place ----------------------------------


@dataclass
class Placement:
    file: RemoteFile
    name: str  # file name in the output folder


@dataclass
class TokenizerPlan:
    """tokenizer.model (+ its checklist) at the folder root, each file replaced atomically."""

    folder: Path
    checklist: bytes
    entries: dict[str, str]
    files: list[RemoteFile]

    def already_done(self) -> bool:
        if _verified(self.folder, self.entries) and _same_bytes(self.folder / TOKENIZER_CHECKLIST, self.checklist):
            log.info("%s: tokenizer already present and verified", self.folder)
            return True
        return False

    def finish(self, fetcher: Fetcher, remote: Remote) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            target = _inside(self.folder, PurePosixPath(file.path).name)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            place_file(fetcher.staged[file.key], tmp, "hardlink-or-copy")
            tmp.replace(target)
        atomic_write_bytes(self.folder / TOKENIZER_CHECKLIST, self.checklist)
        log.info("%s: tokenizer written and verified", self.folder)


@dataclass
class SizePlan:
    """One size folder (`pyllama_data/13B`), renamed into place only once every file is verified."""

    name: str
    target: Path
    checklist: bytes
    entries: dict[str, str]
    placements: list[Placement]

    @property
    def files(self) -> list[RemoteFile]:
        return [p.file for p in self.placements]

    def already_done(self) -> bool:
        if (
            self.target.is_dir()
            and _same_bytes(self.target / CHECKLIST, self.checklist)
            and _verified(self.target, self.entries)
        ):
            log.info("%s: already present and verified against its checklist", self.target)
            return True
        return False

    def finish(self, fetcher: Fetcher, remote: Remote) -> None:
        with atomic_output_dir(self.target) as out:
            for placement in self.placements:
                place_file(fetcher.staged[placement.file.key], _inside(out, placement.name), "hardlink-or-copy")
            (out / CHECKLIST).write_bytes(self.checklist)
            write_manifest(
                out,
                command=_redacted_command(remote.secrets),
                source=remote.shown(""),
                checklist_sha256=hashlib.sha256(self.checklist).hexdigest(),
                files={p.name: p.file.md5 for p in self.placements},
            )
        log.info("%s: %d files written, md5-verified", self.target, len(self.placements))


def _tokenizer_plan(fetcher: Fetcher, folder: Path) -> TokenizerPlan:
    checklist = fetcher.fetch_bytes(TOKENIZER_CHECKLIST)
    entries = parse_checklist(checklist.decode("utf-8", "replace"), fetcher.remote.shown(TOKENIZER_CHECKLIST))
    if "tokenizer.model" not in entries:
        log.warning("%s: does not list tokenizer.model", fetcher.remote.shown(TOKENIZER_CHECKLIST))
    return TokenizerPlan(folder, checklist, entries, [RemoteFile(name, md5) for name, md5 in entries.items()])


def _size_plan(fetcher: Fetcher, name: str, target: Path, llama2_extras: bool) -> SizePlan:
    where = fetcher.remote.shown(f"{name}/{CHECKLIST}")
    checklist = fetcher.fetch_bytes(f"{name}/{CHECKLIST}")
    entries = parse_checklist(checklist.decode("utf-8", "replace"), where)
    _check_shards(name, entries, where)
    placements = [Placement(RemoteFile(f"{name}/{n}", md5), n) for n, md5 in entries.items()]
    if "params.json" not in entries:
        log.warning("%s: does not list params.json; it is fetched without a checksum", where)
        placements.append(Placement(RemoteFile(f"{name}/params.json", None), "params.json"))
    if llama2_extras and name in LLAMA2_SHARDS:
        placements += [Placement(RemoteFile(n, None), n) for n in LLAMA2_LICENSE_FILES]
    return SizePlan(name, target, checklist, entries, placements)


def _drop_staged(fetcher: Fetcher, files: list[RemoteFile]) -> None:
    for file in files:
        staged = fetcher.staged.pop(file.key, None)
        if staged:
            staged.unlink(missing_ok=True)
        (fetcher.staging / f"{file.key}.lock").unlink(missing_ok=True)


def _verified(folder: Path, entries: dict[str, str]) -> bool:
    return all((folder / n).is_file() and md5_file(folder / n) == md5 for n, md5 in entries.items())


def _same_bytes(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


def _redacted_command(secrets: list[str]) -> list[str]:
    redactor = Redactor(secrets)
    return [Path(sys.argv[0]).name, *(redactor.redact(arg) for arg in sys.argv[1:])]


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


# ---- source local: verify an existing copy, then link it ----------------------------------------


def _llama_from_local(
    path: Path | None,
    dirs: list[str],
    tokenizer_only: bool,
    folder: Path,
    link: bool,
    include_tokenizer: bool,
    jobs: int,
) -> Path:
    if path is None:
        raise VicunaflowError("--source local needs --path: a folder in pyllama's layout, or one size folder")
    if not path.is_dir():
        raise VicunaflowError(f"{path}: not a directory (--path of --source local)")
    mode = "hardlink-or-symlink" if link else "copy"
    log.info("download llama: sizes %s from local %s into %s (%s)", ", ".join(dirs) or "-", path, folder, mode)
    for name in dirs:
        src = path / name if (path / name / CHECKLIST).is_file() else path
        if not (src / CHECKLIST).is_file() or (src == path and len(dirs) > 1):
            raise VicunaflowError(
                f"{path}: no {name}/{CHECKLIST} (nor {CHECKLIST}); is it a copy of the raw {name} release?"
            )
        entries = parse_checklist((src / CHECKLIST).read_text(), str(src / CHECKLIST))
        _check_shards(name, entries, str(src / CHECKLIST))
        names = list(entries) + ([] if "params.json" in entries else ["params.json"])
        if "params.json" not in entries:
            if not (src / "params.json").is_file():
                raise VicunaflowError(f"{src}: no params.json; is it a copy of the raw {name} release?")
            log.warning("%s: does not list params.json; it is taken without a checksum", src / CHECKLIST)
        # A checklist that lists tokenizer.model (synth's layout) already brings it along.
        tokenizer_dir = _find_tokenizer(src, path) if include_tokenizer and "tokenizer.model" not in entries else None
        to_check = {src / n: md5 for n, md5 in entries.items()}
        if tokenizer_dir:
            tok_entries = parse_checklist(
                (tokenizer_dir / TOKENIZER_CHECKLIST).read_text(), str(tokenizer_dir / TOKENIZER_CHECKLIST)
            )
            to_check |= {tokenizer_dir / n: md5 for n, md5 in tok_entries.items()}
        _verify_local(to_check, jobs)
        target = folder / name
        if target.resolve() == src.resolve():
            log.info("%s: already in place; verified", target)
            continue
        with atomic_output_dir(target) as out:
            done = {place_file(src / n, _inside(out, n), mode) for n in names}
            shutil.copyfile(src / CHECKLIST, out / CHECKLIST)
            if tokenizer_dir:
                for n in [*tok_entries, TOKENIZER_CHECKLIST]:
                    shutil.copyfile(tokenizer_dir / n, _inside(out, n))
            write_manifest(
                out,
                inputs=[src / CHECKLIST],
                source=f"local:{src.resolve()}",
                files=dict(entries),
            )
        log.info(
            "%s: %d verified files placed (%s)%s",
            target,
            len(names),
            "/".join(sorted(done)),
            " + tokenizer" if tokenizer_dir else "",
        )
    if tokenizer_only:
        tokenizer_dir = _find_tokenizer(path, path)
        if tokenizer_dir is None:
            raise VicunaflowError(f"{path}: no tokenizer.model with {TOKENIZER_CHECKLIST} here or in its parent")
        tok_entries = parse_checklist(
            (tokenizer_dir / TOKENIZER_CHECKLIST).read_text(), str(tokenizer_dir / TOKENIZER_CHECKLIST)
        )
        _verify_local({tokenizer_dir / n: md5 for n, md5 in tok_entries.items()}, jobs)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() != tokenizer_dir.resolve():
            for n in [*tok_entries, TOKENIZER_CHECKLIST]:
                atomic_write_bytes(_inside(folder, n), (tokenizer_dir / n).read_bytes())
        log.info("%s: tokenizer verified and placed", folder)
    return folder / dirs[0] if dirs else folder


def _find_tokenizer(src: Path, root: Path) -> Path | None:
    for candidate in (src, src.parent, root):
        if (candidate / "tokenizer.model").is_file() and (candidate / TOKENIZER_CHECKLIST).is_file():
            return candidate
    if any((c / "tokenizer.model").is_file() for c in (src, src.parent)):
        log.warning("%s: tokenizer.model has no %s next to it; not taken (unverifiable)", src, TOKENIZER_CHECKLIST)
    return None


def _verify_local(expected: dict[Path, str], jobs: int) -> None:
    """md5 every file in parallel; one error listing every missing or mismatching file."""
    missing = [str(p) for p in expected if not p.is_file()]
    if missing:
        raise VicunaflowError(f"missing files listed in the checklist: {', '.join(missing)}")
    log.info("verifying %d files against their checklists", len(expected))
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        actual = dict(zip(expected, pool.map(md5_file, expected), strict=True))
    bad = [f"{p}: md5 mismatch: expected {md5}, got {actual[p]}" for p, md5 in expected.items() if actual[p] != md5]
    if bad:
        raise VicunaflowError("; ".join(bad) + "; the copy is damaged: fetch those files again")


# ---- Hugging Face -------------------------------------------------------------------------------


def _hf_from_hub(
    repo: str,
    local_dir: Path,
    revision: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    repo_type: str,
    token: str | None,
    token_env: str,
    endpoint: str | None,
    staging_dir: Path,
    jobs: int,
) -> Path:
    from huggingface_hub import constants

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    token_from = f"${token_env}" if token else "huggingface_hub's login, if any"
    offline = constants.is_offline_mode()
    log.info(
        "download hf: %s %s at %s from %s into %s; include %s, exclude %s; token from %s",
        repo_type,
        repo,
        revision or "main",
        "the local Hugging Face cache (HF_HUB_OFFLINE)" if offline else redact_url(endpoint),
        local_dir,
        include or "all",
        exclude or "none",
        token_from,
    )
    with _hub_errors(repo, revision, endpoint, token_env):
        if offline:
            root, commit, expected = _hf_cached_snapshot(repo, revision, include, exclude, repo_type)
        else:
            root, commit, expected = _hf_fetch(
                repo, revision, include, exclude, repo_type, token, endpoint, staging_dir, jobs
            )
    bad = _verify_hf_files(root, expected)
    if bad:
        aside = []
        for name, _ in bad:
            if not offline and (root / name).exists():
                target = (
                    staging_dir
                    / "hf"
                    / "corrupt"
                    / (repo.replace("/", "--") + "--" + name.replace("/", "--") + ".corrupt")
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                (root / name).replace(target)
                aside.append(str(target))
        raise VicunaflowError(
            f"{repo}@{commit}: "
            + "; ".join(m for _, m in bad)
            + (f"; kept aside as {', '.join(aside)}" if aside else "")
        )
    with atomic_output_dir(local_dir) as out:
        for name in expected:
            place_file((root / name).resolve() if offline else root / name, _inside_tree(out, name), "hardlink-or-copy")
        write_manifest(
            out,
            command=_redacted_command([token] if token else []),
            repo=repo,
            repo_type=repo_type,
            revision=commit,
            requested_revision=revision or "main",
            endpoint=redact_url(endpoint),
            files={name: {"algorithm": algo, "hash": digest} for name, (algo, digest) in expected.items()},
        )
    if not offline:
        shutil.rmtree(root, ignore_errors=True)
    log.info("%s: %d files of %s at commit %s, verified", local_dir, len(expected), repo, commit)
    return local_dir


def _hf_fetch(repo, revision, include, exclude, repo_type, token, endpoint, staging_dir, jobs):
    """Resolve the revision to a commit first, then fetch exactly that commit into staging (resumable)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=endpoint, token=token)
    commit = api.repo_info(repo, revision=revision, repo_type=repo_type).sha
    tree = {
        f.path: f
        for f in api.list_repo_tree(repo, revision=commit, recursive=True, repo_type=repo_type)
        if isinstance(f, RepoFile)
    }
    names = sorted(filter_repo_objects(list(tree), allow_patterns=include, ignore_patterns=exclude))
    if not names:
        raise VicunaflowError(
            f"{repo}@{commit}: no file matches include={include} exclude={exclude}; files: {', '.join(sorted(tree))}"
        )
    for name in names:
        _safe_tree_name(name, repo)
    stage = staging_dir / "hf" / f"{repo_type}s--{repo.replace('/', '--')}" / commit
    log.info(
        "%s: revision %s is commit %s; %d files to fetch into %s", repo, revision or "main", commit, len(names), stage
    )
    snapshot_download(
        repo,
        repo_type=repo_type,
        revision=commit,
        local_dir=stage,
        allow_patterns=include,
        ignore_patterns=exclude,
        max_workers=max(1, jobs),
        token=token,
        endpoint=endpoint,
    )
    expected = {}
    for name in names:
        entry = tree[name]
        expected[name] = ("sha256", entry.lfs.sha256) if entry.lfs else ("git-sha1", entry.blob_id)
    return stage, commit, expected


def _hf_cached_snapshot(repo, revision, include, exclude, repo_type):
    """HF_HUB_OFFLINE: take the files from the Hugging Face cache; verify them when the cache kept the tree."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    snapshot = Path(
        snapshot_download(
            repo,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=include,
            ignore_patterns=exclude,
            local_files_only=True,
        )
    )
    commit = snapshot.name
    cached = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    files = sorted(filter_repo_objects(cached, allow_patterns=include, ignore_patterns=exclude))
    try:
        tree = {f.path: f for f in get_cached_repo_tree(repo, repo_type=repo_type, revision=commit)}
    except Exception as err:  # the cache has no tree listing for this commit (older huggingface_hub)
        log.warning(
            "%s@%s: no cached file listing to verify against (%s); hashes recorded only",
            repo,
            commit,
            type(err).__name__,
        )
        tree = {}
    expected = {}
    for name in files:
        _safe_tree_name(name, repo)
        entry = tree.get(name)
        if entry is None:
            expected[name] = ("sha256", None)
        else:
            expected[name] = ("sha256", entry.lfs.sha256) if entry.lfs else ("git-sha1", entry.blob_id)
    log.info("%s: offline, from the cached snapshot %s (commit %s)", repo, snapshot, commit)
    return snapshot, commit, expected


def _verify_hf_files(root: Path, expected: dict[str, tuple[str, str | None]]) -> list[tuple[str, str]]:
    """Check each file against the Hub's hash (LFS sha256 or git blob sha1); fill in unknown sha256s."""
    bad = []
    for name, (algorithm, digest) in list(expected.items()):
        path = root / name
        if not path.is_file():
            bad.append((name, f"{name}: missing after download"))
            continue
        actual = sha256_file(path) if algorithm == "sha256" else _git_blob_sha1(path)
        if digest is None:
            expected[name] = (algorithm, actual)
        elif actual != digest:
            bad.append((name, f"{name}: {algorithm} mismatch: expected {digest}, got {actual}"))
    return bad


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _safe_tree_name(name: str, where: str) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or not pure.parts:
        raise VicunaflowError(f"{where}: refusing file {name!r}: it would be written outside the output folder")


def _inside_tree(folder: Path, name: str) -> Path:
    _safe_tree_name(name, str(folder))
    return folder / name


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, endpoint: str, token_env: str) -> Iterator[None]:
    """huggingface_hub's exceptions -> one line that says what to do."""
    from huggingface_hub import errors

    shown = redact_url(endpoint)
    try:
        yield
    except errors.RevisionNotFoundError:
        raise VicunaflowError(f"{repo}: revision {revision!r} not found on {shown}; check --revision") from None
    except errors.GatedRepoError:
        raise VicunaflowError(
            f"{repo}: gated repository: accept its license on {shown}, then set ${token_env} or run `hf auth login`"
        ) from None
    except errors.RepositoryNotFoundError:
        raise VicunaflowError(
            f"{repo}: repository not found on {shown} (or private: set ${token_env} or run `hf auth login`)"
        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.IncompleteSnapshotError) as err:
        raise VicunaflowError(
            f"{repo}: not available offline ({type(err).__name__}): HF_HUB_OFFLINE is set or {shown} cannot be "
            "reached, and the Hugging Face cache does not hold this revision; go online, or use --source local --path DIR"
        ) from None
    except errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise VicunaflowError(
            f"{repo}: {shown} answered HTTP {status}; try again later, or use --source local --path DIR"
        ) from None
    except OSError as err:
        raise VicunaflowError(
            f"{repo}: {shown} cannot be reached ({err}); check the network or HF_ENDPOINT, or use --source local --path DIR"
        ) from None
    except Exception as err:
        # httpx2's transport errors (connection refused, DNS, timeouts) are not OSErrors.
        if type(err).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore"):
            raise VicunaflowError(
                f"{repo}: {shown} cannot be reached ({type(err).__name__}: {err}); check the network or HF_ENDPOINT, "
                "or use --source local --path DIR"
            ) from None
        raise


def _hf_from_local(path: Path | None, local_dir: Path, link: bool) -> Path:
    """An existing Hugging Face folder: hashes checked against its vicunaflow.json (when it has one) and
    every shard its index names present; then linked into place."""
    if path is None or not path.is_dir():
        raise VicunaflowError(f"{path}: not a directory (--path of download hf --source local)")
    names = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).parts[0] not in (".cache", ".git") and p.name != "vicunaflow.json"
    )
    if not names:
        raise VicunaflowError(f"{path}: empty directory")
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as err:
            raise VicunaflowError(f"{index}: not a weight index ({err})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise VicunaflowError(f"{index}: names shards that are missing: {', '.join(missing)}")
    previous = path / "vicunaflow.json"
    recorded = {}
    if previous.is_file():
        recorded = json.loads(previous.read_text()).get("files", {})
    expected = {n: (recorded[n]["algorithm"], recorded[n]["hash"]) for n in names if isinstance(recorded.get(n), dict)}
    bad = _verify_hf_files(path, expected)
    if bad:
        raise VicunaflowError(f"{path}: " + "; ".join(m for _, m in bad) + "; the copy is damaged")
    mode = "hardlink-or-symlink" if link else "copy"
    log.info(
        "download hf: local %s into %s (%s); %d of %d files hash-checked",
        path,
        local_dir,
        mode,
        len(expected),
        len(names),
    )
    with atomic_output_dir(local_dir) as out:
        for name in names:
            place_file(path / name, _inside_tree(out, name), mode)
        extra = {}
        if previous.is_file():
            provenance = json.loads(previous.read_text())
            extra = {k: provenance[k] for k in ("repo", "revision", "repo_type") if k in provenance}
        write_manifest(
            out,
            source=f"local:{path.resolve()}",
            files={n: {"algorithm": a, "hash": h} for n, (a, h) in expected.items()},
            **extra,
        )
    return local_dir
