"""Output directories that are either complete or absent, each with a provenance manifest.

Every verb that writes a model or dataset directory goes through `atomic_output_dir`: it writes
into a hidden temporary sibling and renames it into place only after success, so a crash, an
error, Ctrl-C or SIGTERM never leaves a directory that looks finished.

Replacing the output is the one destructive step, so it is guarded (`check_output_dir`, which each
verb also calls first, before any heavy work):
- an output path that is, contains or lies inside an input, or is (or contains) the working
  directory, the home directory or a filesystem root, is refused, `--overwrite` or not;
- an existing output is replaced only when it is a complete earlier output of the same verb holding
  nothing else (its `vicunaflow.json` says which verb wrote it, and `written_files` what it wrote), or an
  empty directory, or when `--overwrite` is given: a folder another verb wrote, or one where the user
  put files of their own, is refused.
Snakemake deletes a job's outputs before running it, so workflow runs never meet the second rule.

A temporary is named `.<name>.tmp-<pid>.<start>@<host>~<pidns>-XXXXXXXX`: the process that owns it (pid,
its start time, to tell a reused pid apart, and host and PID namespace, for shared file systems and
containers that share a hostname). A process killed
with `kill -9` cannot clean up; the next write of the same output removes the temporaries whose
owner is gone from this host. Those of a live process, or of another host, are left alone.
Single files (`atomic_output_file`: data files, eval results) get temporaries named, registered and
removed the same way. A file cannot carry a manifest, so each one finished is recorded in a hidden
sidecar beside it, `.<name>.vicunaflow.json` (the verb, the file's size and modification time), and
`check_output_files` replaces an existing file without --overwrite only while its sidecar says it is
this verb's earlier output, unchanged since. The same rule is applied again right before the rename, with the
flag and --overwrite that check was given: a file the user puts there during a long run is kept, not replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import vicunaflow

MANIFEST = "vicunaflow.json"
# The verb this process runs ("quantize", "data tokenize"), set by the CLI: manifests record it, and an output
# is replaced without --overwrite only by the verb that wrote it. None outside the CLI (library calls).
VERB: str | None = None

log = logging.getLogger(__name__)

# What `check_output_files` decided for each output file (its landing place): the flag that names it and whether
# --overwrite was given, so `atomic_output_file` applies the same rule again right before its rename. Cleared with
# VERB by the CLI.
CHECKED_FILES: dict[Path, tuple[str, bool]] = {}
# The landing places of the checked files this command has put in place: the re-check before a rename covers every
# checked file not among them, so when one of a verb's several outputs is refused, none of them has landed yet.
WRITTEN_FILES: set[Path] = set()

# What this process must clean up if stopped now (temporaries it writes, child servers it runs):
# a SIGTERM unwinds only when there is any.
_ACTIVE: set[object] = set()


class Terminated(BaseException):
    """Raised by the SIGTERM handler (Snakemake and SLURM stop jobs with SIGTERM), like KeyboardInterrupt
    for SIGINT: it unwinds through `atomic_output_dir`, which removes its temporary. A BaseException so
    that no `except Exception` swallows it."""


def check_output_dir(
    target: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False
) -> Path:
    """Refuse, before any work, an output path whose replacement would destroy something else.

    Raises VicunaflowError, naming both paths, when `target` is, contains or lies inside one of
    `inputs`, is or contains the working directory, the home directory or a filesystem root, or
    exists and is neither a complete vicunaflow output nor an empty directory (unless `overwrite`).
    """
    target = Path(target)
    # Where the rename lands: the parent resolved, the name kept (a symlink there is replaced, not followed);
    # and where a symlink at the target points, which is refused too when it is an input.
    places = {_landing_place(target), target.resolve()}
    for place in sorted(places):
        if place.parent == place:
            raise vicunaflow.VicunaflowError(
                f"refusing to write the output {target}: it is the filesystem root {place}"
            )
        for name, protected in _protected_dirs():
            relation = _relation(place, {protected.resolve()})
            if relation in ("is", "contains"):
                raise vicunaflow.VicunaflowError(
                    f"refusing to write the output {target}: it {relation} the {name} {protected}; "
                    "replacing it would delete everything in it"
                )
        for given in inputs:
            if given is None:
                continue
            relation = _relation(place, {Path(os.path.abspath(given)), Path(given).resolve()})
            if relation:
                raise vicunaflow.VicunaflowError(
                    f"refusing to write the output {target}: it {relation} the input {given}; "
                    "choose an output path outside the inputs"
                )
    if not overwrite and (target.exists() or target.is_symlink()):
        reason = _why_kept(target)
        if reason:
            raise vicunaflow.VicunaflowError(
                f"{target} exists and {reason}; refusing to replace it: move it away, choose another output "
                "path, or pass --overwrite"
            )
    check_writable(_landing_place(target).parent)
    return target


def check_output_files(
    outputs: dict[str, str | os.PathLike | None],
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> None:
    """Refuse, before any work, output files ({flag: path}; None: not written) that would destroy what the
    user did not ask to replace, or be lost: one that is an input file or lies inside an input folder (a
    model's config.json), one that is a folder, two outputs at one path (the second would replace the first),
    an existing file that is not this verb's unchanged earlier output (unless `overwrite`; see
    `provenance_sidecar`), or one whose folder cannot be written (found now, not after hours of generation).
    Each file's flag and `overwrite` are kept (CHECKED_FILES) for the same check right before its rename."""
    inputs = [given for given in inputs if given is not None]
    taken: dict[Path, str] = {}
    for flag, output in outputs.items():
        if output is None:
            continue
        output = Path(output)
        if output.is_dir():
            raise vicunaflow.VicunaflowError(f"{flag} {output} is a directory; give a file path for the output")
        for given in inputs:
            relation = path_relation(output, given)
            if relation in ("is", "lies inside"):
                raise vicunaflow.VicunaflowError(
                    f"refusing to write {flag} {output}: it {relation} the input {given}; "
                    "choose an output path outside the inputs"
                )
        place = output.resolve()
        if place in taken:
            raise vicunaflow.VicunaflowError(
                f"{taken[place]} and {flag} are both {output}: the second would replace the first; give each its own path"
            )
        taken[place] = flag
        landing = _landing_place(output)
        CHECKED_FILES[landing] = (flag, overwrite)
        WRITTEN_FILES.discard(landing)
        _refuse_replacing_a_kept_file(flag, output, overwrite)
        check_writable(output.parent)


def _refuse_replacing_a_kept_file(flag: str, output: Path, overwrite: bool, *, while_running: bool = False) -> None:
    """Raise VicunaflowError when `output` exists and may not be replaced (see `_why_file_kept`) without --overwrite.
    while_running: the file appeared or changed during the run (the re-check before the rename)."""
    if overwrite or not (output.exists() or output.is_symlink()):
        return
    reason = _why_file_kept(output)
    if reason:
        when = (
            "; it appeared or changed there while this run worked, so its result is discarded" if while_running else ""
        )
        raise vicunaflow.VicunaflowError(
            f"{flag} {output} exists and {reason}{when}; refusing to replace it: move it away, give {flag} "
            "another path, or pass --overwrite to replace it"
        )


def _landing_place(target: str | os.PathLike) -> Path:
    """Where a rename to `target` lands: its folder resolved, its name kept (a symlink there is replaced)."""
    absolute = Path(os.path.abspath(target))
    return absolute.parent.resolve() / absolute.name


def _recheck_before_rename(target: Path) -> None:
    """`check_output_files`'s rule again, right before `target`'s rename: for `target` (with the flag and
    --overwrite it was checked with; none: not replaced unless it is this verb's unchanged output) and for every
    other checked file this command has not yet put in place, so that a refusal comes before the first lands."""
    place = _landing_place(target)
    pending = {path: checked for path, checked in CHECKED_FILES.items() if path not in WRITTEN_FILES}
    pending[place] = CHECKED_FILES.get(place, ("the output", False))
    for path, (flag, overwrite) in pending.items():
        _refuse_replacing_a_kept_file(flag, target if path == place else path, overwrite, while_running=True)


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse a folder (or, while it does not exist, its nearest existing parent) this process cannot create
    files in: tried for real (a temporary file, removed at once), since permission bits do not tell root
    about read-only mounts or immutable folders."""
    place = Path(os.path.abspath(folder))
    while not place.exists() and place.parent != place:
        place = place.parent
    try:
        with tempfile.NamedTemporaryFile(dir=place, prefix=".vicunaflow-write-test-"):
            pass
    except OSError as err:
        raise vicunaflow.VicunaflowError(
            f"cannot write in {place} ({err.strerror or err}): choose an output path in a folder you can write"
        ) from None


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block succeeds.

    `target` is checked first (`check_output_dir`, with `inputs` and `overwrite`), and the
    temporaries of earlier writes of it that were killed (their owner gone) are removed.
    """
    inputs = list(inputs)
    target = check_output_dir(target, inputs=inputs, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=target.parent))
    _ACTIVE.add(tmp)
    try:
        yield tmp
        _record_files(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
        # Checked again: the block ran for a while, and something may have appeared at the target meanwhile.
        check_output_dir(target, inputs=inputs, overwrite=overwrite)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(tmp)


@contextlib.contextmanager
def atomic_output_file(target: str | os.PathLike, *, provenance: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `target` that replaces `target` when the block succeeds.

    Named as a folder's temporary is (its owner), and removed on an error, Ctrl-C or SIGTERM; the
    temporaries of earlier writes of `target` whose owner is gone are removed first. The file in place,
    its provenance sidecar is written (unless `provenance` is false: a file inside a folder that is
    checked another way), so a later run of the same verb may replace it while it is unchanged.

    With `provenance`, right before the rename `target` is checked again by `check_output_files`'s rule, with
    the flag and --overwrite it was checked with (none: not replaced unless it is this verb's unchanged output),
    and so is every other checked output of the command not yet in place: a file that appeared at one during
    the block is refused, kept as it is, and the temporary removed (`_recheck_before_rename`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target.name), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    _ACTIVE.add(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; outputs are meant to be shared
        if provenance:  # the block ran for a while, and the user may have put a file at an output meanwhile
            _recheck_before_rename(target)
        os.replace(tmp, target)
        if provenance:
            _record_file(target)
            WRITTEN_FILES.add(_landing_place(target))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        _ACTIVE.discard(tmp)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (folders or files) of `target` left by killed processes of this host;
    return what was removed."""
    target = Path(target)
    removed = []
    # _temp_prefix's pid, start time and host, then mkdtemp's (or mkstemp's) 8 characters of [a-z0-9_].
    pattern = re.compile(re.escape(f".{target.name}.tmp-") + r"(\d+)\.(\d+)@([^@/]+)-[a-z0-9_]{8}")
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(target.parent.iterdir()):
            if not entry.name.startswith(f".{target.name}.tmp-") or entry.is_symlink():
                continue
            if not (entry.is_dir() or entry.is_file()):
                continue
            match = pattern.fullmatch(entry.name)
            if match is None:
                # Written before temporaries named their owner: nothing says whether it is still in use.
                log.warning(
                    "%s: a temporary of an earlier version of vicunaflow; remove it if no job is writing", entry
                )
                continue
            pid, start, host = int(match[1]), int(match[2]), match[3]
            if host != _host() or _alive(pid, start):
                continue
            log.info("removing %s, left by process %d, which is gone", entry, pid)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM cleans up as Ctrl-C does: raise `Terminated` so partial outputs go.

    Only while this process writes an output; otherwise SIGTERM keeps its usual effect (e.g. the
    parent of a torchrun launch still dies at once, as it did). A second SIGTERM, during the cleanup,
    kills at once. Does nothing outside the main thread, where handlers cannot be set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # whoever started us asked for SIGTERM to be ignored (nohup-like)
        yield
        return

    def handler(signum, frame):
        if not _ACTIVE:
            if callable(previous):
                return previous(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # die of SIGTERM, as without this handler
            return None
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM does not wait for the cleanup
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def unwound_by_sigterm() -> Iterator[None]:
    """While the block runs, a SIGTERM raises `Terminated` in it, so its `finally` runs (e.g. stopping a
    child server, which SIGTERM's default action would leave orphaned); the same handler as the CLI's."""
    owner = object()
    with terminate_on_sigterm():
        _ACTIVE.add(owner)
        try:
            yield
        finally:
            _ACTIVE.discard(owner)


def path_relation(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `path` stands to `other`, both as written (absolute) and resolved: is, contains, lies inside, or None."""
    others = {Path(os.path.abspath(other)), Path(other).resolve()}
    for place in sorted({Path(os.path.abspath(path)), Path(path).resolve()}):
        if relation := _relation(place, others):
            return relation
    return None


def _protected_dirs() -> list[tuple[str, Path]]:
    """The working and home directories, where they can be known (a deleted cwd or no HOME are not errors here)."""
    found = []
    for name, where in (("working directory", Path.cwd), ("home directory", Path.home)):
        with contextlib.suppress(OSError, RuntimeError):
            found.append((name, where()))
    return found


def _relation(place: Path, others: set[Path]) -> str | None:
    """How the path `place` stands to another path (given as its spellings): is, contains, lies inside, or None."""
    for other in others:
        if place == other:
            return "is"
    for other in others:
        if other.is_relative_to(place):
            return "contains"
    for other in others:
        if place.is_relative_to(other):
            return "lies inside"
    return None


def _why_kept(target: Path) -> str | None:
    """Why `target` may not be replaced without --overwrite ("is not a complete vicunaflow output ..."), or
    None: it is an empty directory, or a complete earlier output (its manifest is vicunaflow's) written by
    this verb (when both are known) and holding only the files that verb wrote (when its manifest lists them)."""
    not_ours = f"is not a complete vicunaflow output (no {MANIFEST} written by vicunaflow)"
    if not target.is_dir():
        return not_ours
    manifest = target / MANIFEST
    if not manifest.is_file():
        return None if not any(target.iterdir()) else not_ours
    try:
        written = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return not_ours
    if not isinstance(written, dict) or "vicunaflow" not in (written.get("versions") or {}):
        return not_ours
    if VERB and written.get("verb") and written["verb"] != VERB:
        return f"holds the output of `vicunaflow {written['verb']}`, not of `vicunaflow {VERB}`"
    if isinstance(written.get("written_files"), list):
        others = sorted(set(_files(target)) - set(written["written_files"]) - {MANIFEST})
        if others:
            return f"holds files vicunaflow did not write there ({vicunaflow.first_few(others, 3)})"
    return None


def provenance_sidecar(target: str | os.PathLike) -> Path:
    """Where the record of a finished output file is kept: a hidden file beside it (not a declared output, so
    Snakemake ignores it), since JSONL, TSV or SVG cannot carry a manifest."""
    target = Path(target)
    return target.with_name(f".{target.name}.{MANIFEST}")


def _record_file(target: Path) -> None:
    """Write `target`'s sidecar after `target` is in place: a crash between the two leaves a file without one,
    which is refused (kept) later, never one replaced wrongly. Size and modification time, not a hash: cheap
    for gigabytes of JSONL, and any edit changes them."""
    stat = target.lstat()
    record = {"verb": VERB, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "vicunaflow": vicunaflow.__version__}
    provenance_sidecar(target).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _why_file_kept(target: Path) -> str | None:
    """Why the existing file `target` may not be replaced without --overwrite, or None: its sidecar says this verb
    (when both are known) wrote it, and its size and modification time are still those recorded."""
    sidecar = provenance_sidecar(target)
    try:
        record = json.loads(sidecar.read_text())
        stat = target.lstat()
    except (OSError, ValueError):
        return f"was not written by vicunaflow (no {sidecar.name} beside it)"
    if not isinstance(record, dict) or "vicunaflow" not in record:
        return f"was not written by vicunaflow ({sidecar.name} is not vicunaflow's)"
    if VERB and record.get("verb") and record["verb"] != VERB:
        return f"holds the output of `vicunaflow {record['verb']}`, not of `vicunaflow {VERB}`"
    if (record.get("size"), record.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return f"was changed since vicunaflow wrote it (its size or time differ from {sidecar.name})"
    return None


def _files(folder: Path) -> list[str]:
    """The files below `folder`, as paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _record_files(folder: Path) -> None:
    """Add the list of what the verb wrote to the folder's manifest (if it has one): a later run replaces the
    folder only while it holds nothing more."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    manifest["written_files"] = [name for name in _files(folder) if name != MANIFEST]  # "files": download's hashes
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _host() -> str:
    """This host and its PID namespace: pids compare only within one (containers may share a hostname)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"
    try:
        return f"{host}~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (not Linux): the hostname alone
        return host


def _proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on (Linux); empty where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()  # the command name before ")" may hold spaces


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat); 0 where unknown."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else 0


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":  # killed, not yet reaped by its parent
        return False
    # The pid is in use: by the owner, unless the number was reused by a process started at another time.
    return not (start and fields and int(fields[19]) != start)


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}.{_start_time(os.getpid())}@{_host()}-"


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, provenance: bool = True) -> None:
    with atomic_output_file(path, provenance=provenance) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    return _hash_file(hashlib.sha256(), path, chunk)


def md5_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """md5 as `md5sum` prints it: Meta's checklist.chk files use it."""
    return _hash_file(hashlib.md5(), path, chunk)


def _hash_file(digest, path: str | os.PathLike, chunk: int) -> str:
    """Stream the file in `chunk`-byte blocks so multi-GB shards never sit in memory whole."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"vicunaflow": vicunaflow.__version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "tokenizers", "sentencepiece", "huggingface_hub", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return versions


def write_manifest(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), **extra) -> dict:
    """Write `vicunaflow.json`: the command, tool versions and sha256 of the given input files.

    Input sha256 sums make provenance checkable ("which delta was this merged from?").
    The timestamp is deliberately left out so identical inputs give identical bytes.
    """
    manifest = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "versions": tool_versions(),
        "inputs": {str(p): sha256_file(p) for p in sorted(map(str, inputs))},
        **({"verb": VERB} if VERB else {}),
        **extra,
    }
    Path(out_dir, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
