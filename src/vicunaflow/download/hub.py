"""Hugging Face repositories: fetched at a commit resolved up front, or taken from a local folder;
every file checked against the Hub's hash (LFS sha256 or git blob sha1).

huggingface_hub is imported only inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from vicunaflow import VicunaflowError, first_few
from vicunaflow.download.http import place_file, redact_url, redacted_command
from vicunaflow.outputs import atomic_output_dir, sha256_file, write_manifest

# One logger for the package, so log lines name `vicunaflow.download` as before the split.
log = logging.getLogger("vicunaflow.download")


class HubUnavailable(VicunaflowError):
    """The Hub could not give the files: offline without them cached, unreachable, or an HTTP error.

    The message ends with download hf's way around it, `--source local --path DIR`; a verb without those flags
    (`data fetch`) says its own after `problem`, rather than naming flags it does not have.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}, or use --source local --path DIR")
        self.problem = problem


class NoFileMatches(VicunaflowError):
    """No file of the repository at this commit matches --include / --exclude. `files` is what it holds, for a caller
    that words its own error (data fetch names the files under a folder given as a file)."""

    def __init__(self, repo: str, commit: str, include, exclude, files: list[str]) -> None:
        super().__init__(
            f"{repo}@{commit}: no file matches include={include} exclude={exclude}; files: {', '.join(files)}"
        )
        self.files = files


@dataclass(frozen=True)
class HubRepo:
    """What to take from the Hub: a repository at a revision (default: main), the files matching include/exclude."""

    repo: str
    revision: str | None = None
    include: list[str] | None = None  # glob patterns; None: every file
    exclude: list[str] | None = None
    repo_type: Literal["model", "dataset"] = "model"


def hf_from_hub(
    source: HubRepo,
    *,
    local_dir: Path,
    token: str | None,
    token_env: str,
    endpoint: str | None,
    staging_dir: Path,
    jobs: int,
    overwrite: bool = False,
) -> Path:
    """Fetch `source` at a commit resolved up front (or, with HF_HUB_OFFLINE, from the cache), verify, place whole.

    `token` is the secret itself (never logged); `token_env` only names where it came from, for messages.
    """
    from huggingface_hub import constants

    repo, revision, repo_type = source.repo, source.revision, source.repo_type
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
        source.include or "all",
        source.exclude or "none",
        token_from,
    )
    with contextlib.ExitStack() as stage_in_use:
        with _hub_errors(source, endpoint=endpoint, token_env=token_env):
            if offline:
                root, commit, expected = _hf_cached_snapshot(source)
            else:
                root, commit, expected = stage_in_use.enter_context(
                    _hf_fetch(source, token=token, endpoint=endpoint, staging_dir=staging_dir, jobs=jobs)
                )
        if not expected:  # never a finished output that holds nothing of the repository
            raise VicunaflowError(f"{repo}@{commit}: no file to write; nothing was written")
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
        with atomic_output_dir(local_dir, inputs=[staging_dir], overwrite=overwrite) as out:
            for name in expected:
                place_file(
                    (root / name).resolve() if offline else root / name, _inside_tree(out, name), "hardlink-or-copy"
                )
            write_manifest(
                out,
                command=redacted_command([token] if token else []),
                repo=repo,
                repo_type=repo_type,
                revision=commit,
                requested_revision=revision or "main",
                endpoint=redact_url(endpoint),
                files={name: {"algorithm": algo, "hash": digest} for name, (algo, digest) in expected.items()},
            )
    log.info("%s: %d files of %s at commit %s, verified", local_dir, len(expected), repo, commit)
    return local_dir


@contextlib.contextmanager
def _hf_fetch(
    source: HubRepo, *, token: str | None, endpoint: str, staging_dir: Path, jobs: int
) -> Iterator[tuple[Path, str, dict[str, tuple[str, str | None]]]]:
    """Resolve the revision to a commit first, then fetch exactly that commit's files into a stage of their own.

    The stage is named by the commit and the files fetched, so a run that crashed is continued by the next run
    of the same fetch, while a run fetching other files of the repository (another `data fetch` of the same
    dataset, under `snakemake -j2`) works in another stage. It is held, locked, until the caller's block ends,
    and removed only when that block succeeds.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    repo, revision, include, exclude, repo_type = (
        source.repo, source.revision, source.include, source.exclude, source.repo_type
    )  # fmt: skip
    api = HfApi(endpoint=endpoint, token=token)
    commit = api.repo_info(repo, revision=revision, repo_type=repo_type).sha
    tree = {
        f.path: f
        for f in api.list_repo_tree(repo, revision=commit, recursive=True, repo_type=repo_type)
        if isinstance(f, RepoFile)
    }
    names = sorted(filter_repo_objects(list(tree), allow_patterns=include, ignore_patterns=exclude))
    if not names:
        raise NoFileMatches(repo, commit, include, exclude, sorted(tree))
    for name in names:
        _safe_tree_name(name, repo)
    files_key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    stage = staging_dir / "hf" / f"{repo_type}s--{repo.replace('/', '--')}" / f"{commit}--{files_key}"
    with _stage_in_use(stage):
        log.info(
            "%s: revision %s is commit %s; %d files to fetch into %s",
            repo,
            revision or "main",
            commit,
            len(names),
            stage,
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
        yield stage, commit, expected
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _stage_in_use(stage: Path) -> Iterator[None]:
    """Hold `stage` alone: a second run of the same fetch waits rather than deleting files still being written.

    The lock is a file beside the stage, removed by its holder; a waiter that wakes to find the file gone or
    replaced locks again, so no two runs can ever hold the stage at once. A crashed run's lock goes with it.
    """
    lock_path = stage.with_name(stage.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another run is fetching the same files into it; waiting for it to finish", stage)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(lock), os.stat(lock_path)):
                break
        except FileNotFoundError:
            pass
        os.close(lock)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(lock)


def _hf_cached_snapshot(source: HubRepo) -> tuple[Path, str, dict[str, tuple[str, str | None]]]:
    """HF_HUB_OFFLINE: take the files from the Hugging Face cache; verify them when the cache kept the tree.

    The cache often holds only part of a repository (transformers' from_pretrained, `hf_hub_download` of one
    file), so the snapshot is taken only when the cache shows every requested file is there: with the cached
    file listing, every listed file the patterns select; without it, a match for every include pattern (and no
    patterns at all cannot be shown complete). Either way every shard a weight index names must be there.
    """
    from huggingface_hub import constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError
    from huggingface_hub.utils import filter_repo_objects

    repo, revision, include, exclude, repo_type = (
        source.repo, source.revision, source.include, source.exclude, source.repo_type
    )  # fmt: skip

    try:
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
    except IncompleteSnapshotError as err:  # the checks below name what is missing
        snapshot = Path(err.snapshot_path)
    commit = snapshot.name
    cached = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    try:
        tree = {f.path: f for f in get_cached_repo_tree(repo, repo_type=repo_type, revision=commit)}
    except Exception as err:  # the cache has no tree listing for this commit (hf_hub_download, older huggingface_hub)
        log.warning(
            "%s@%s: no cached file listing to verify against (%s); hashes recorded only",
            repo,
            commit,
            type(err).__name__,
        )
        tree = {}

    def unavailable(why: str) -> HubUnavailable:
        return HubUnavailable(
            f"{repo}@{commit}: not available offline: HF_HUB_OFFLINE is set and the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) holds only part of it ({why}); nothing was written. Fetch it once "
            "online (unset HF_HUB_OFFLINE)"
        )

    if tree:
        files = sorted(filter_repo_objects(list(tree), allow_patterns=include, ignore_patterns=exclude))
        if not files:
            raise NoFileMatches(repo, commit, include, exclude, sorted(tree))
        missing = [name for name in files if name not in cached]
        if missing:
            raise unavailable(
                f"{len(missing)} of the {len(files)} requested files are not cached: {first_few(missing)}"
            )
    elif include is None:
        raise unavailable(
            f"no file listing of this commit is cached, so nothing shows that its {len(cached)} cached files "
            f"[{first_few(cached)}] are the whole repository: name the files you need with --include"
        )
    else:
        files = sorted(filter_repo_objects(cached, allow_patterns=include, ignore_patterns=exclude))
        unmatched = [
            pattern
            for pattern in include
            if not any(filter_repo_objects(cached, allow_patterns=[pattern], ignore_patterns=exclude))
        ]
        if unmatched:
            raise unavailable(f"nothing cached matches {first_few(unmatched)}; cached: {first_few(cached) or 'none'}")
    shards = {
        shard
        for name in files
        if name.endswith(".index.json")
        for shard in _index_shards(snapshot / name)
        if any(filter_repo_objects([shard], allow_patterns=include, ignore_patterns=exclude))
    }
    missing_shards = sorted(shards - set(cached))
    if missing_shards:
        raise unavailable(f"the weight index names shards that are not cached: {first_few(missing_shards)}")
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


def _index_shards(index: Path) -> set[str]:
    """The shard files a sharded checkpoint's `*.index.json` names."""
    try:
        return set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VicunaflowError(f"{index}: not a weight index ({err})") from None


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
def _hub_errors(source: HubRepo, *, endpoint: str, token_env: str) -> Iterator[None]:
    """huggingface_hub's exceptions -> one line that says what to do."""
    from huggingface_hub import errors

    repo, revision = source.repo, source.revision

    shown = redact_url(endpoint)
    try:
        yield
    except errors.HFValidationError as err:  # checked before any request: the id cannot name a repository
        raise VicunaflowError(
            f"{repo}: not a Hugging Face repository id ({str(err).rstrip('.')}); give owner/name, as in the repository's URL"
        ) from None
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
        raise HubUnavailable(
            f"{repo}: not available offline ({type(err).__name__}): HF_HUB_OFFLINE is set or {shown} cannot be "
            "reached, and the Hugging Face cache does not hold this revision; go online"
        ) from None
    except errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise HubUnavailable(f"{repo}: {shown} answered HTTP {status}; try again later") from None
    except (ConnectionError, TimeoutError, socket.gaierror) as err:
        raise HubUnavailable(f"{repo}: {shown} cannot be reached ({err}); check the network or HF_ENDPOINT") from None
    except OSError as err:  # a file here, not the network: going offline or --source local would not help
        raise VicunaflowError(
            f"{repo}: a local file operation failed while fetching ({err}); not a network problem: check free "
            "space and permissions of --staging-dir and the Hugging Face cache"
        ) from None
    except Exception as err:
        # httpx2's transport errors (connection refused, DNS, timeouts) are not OSErrors.
        if type(err).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore"):
            raise HubUnavailable(
                f"{repo}: {shown} cannot be reached ({type(err).__name__}: {err}); check the network or HF_ENDPOINT"
            ) from None
        raise


def hf_from_local(*, path: Path | None, local_dir: Path, link: bool, overwrite: bool = False) -> Path:
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
        missing = sorted(s for s in _index_shards(index) if not (path / s).is_file())
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
    with atomic_output_dir(local_dir, inputs=[path], overwrite=overwrite) as out:
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
