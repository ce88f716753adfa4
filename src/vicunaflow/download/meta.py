"""Raw LLaMA checkpoints in pyllama's layout: from pyllama's mirror, Meta's signed URL or a local copy.

Every file is checked against the md5 checklist of its folder before it reaches an output folder;
what each output needs is a plan, fetched by `http.Fetcher`, then put in place whole.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from vicunaflow import VicunaflowError
from vicunaflow.download.http import Fetcher, Remote, RemoteFile, place_file, redact_url, redacted_command, redacting
from vicunaflow.outputs import atomic_output_dir, atomic_write_bytes, check_output_dir, md5_file, write_manifest
from vicunaflow.sizes import RAW_DIR_TO_SIZE, SIZES, get_size

# One logger for the package, so log lines name `vicunaflow.download` as before the split.
log = logging.getLogger("vicunaflow.download")

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
        # the tokenizer is verified against its checklist, not replaced by a file-output check: no sidecar
        atomic_write_bytes(self.folder / TOKENIZER_CHECKLIST, self.checklist, provenance=False)
        log.info("%s: tokenizer written and verified", self.folder)


@dataclass
class SizePlan:
    """One size folder (`pyllama_data/13B`), renamed into place only once every file is verified."""

    name: str
    target: Path
    checklist: bytes
    entries: dict[str, str]
    placements: list[Placement]
    overwrite: bool = False  # replace a target that is not a vicunaflow output

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
        with atomic_output_dir(self.target, inputs=[fetcher.staging], overwrite=self.overwrite) as out:
            for placement in self.placements:
                place_file(fetcher.staged[placement.file.key], _inside(out, placement.name), "hardlink-or-copy")
            (out / CHECKLIST).write_bytes(self.checklist)
            write_manifest(
                out,
                command=redacted_command(remote.secrets),
                source=remote.shown(""),
                checklist_sha256=hashlib.sha256(self.checklist).hexdigest(),
                files={p.name: p.file.md5 for p in self.placements},
            )
        log.info("%s: %d files written, md5-verified", self.target, len(self.placements))


def llama_from_mirror(
    *,
    source: Literal["pyllama", "meta"],
    base_url: str | None,
    url: str | None,
    url_env: str,
    dirs: list[str],
    tokenizer: bool,
    folder: Path,
    staging_dir: Path,
    jobs: int,
    retries: int,
    retry_wait: float,
    timeout: float,
    overwrite: bool = False,
) -> None:
    """Fetch the size folders `dirs` (and the shared tokenizer) over HTTP, verify them, put each in place whole."""
    remote = Remote(_url_template(source, base_url, url, url_env))
    with redacting(remote.secrets):
        log.info(
            "download llama: sizes %s%s from %s (source %s) into %s; staging %s; %d parallel, %d retries",
            ", ".join(dirs) or "-",
            " + tokenizer" if tokenizer else "",
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
            if tokenizer:
                plans.append(_tokenizer_plan(fetcher, folder))
            for name in dirs:
                plans.append(_size_plan(fetcher, name, folder / name, llama2_extras=source == "meta"))
            todo = [plan for plan in plans if not plan.already_done()]
            for plan in todo:
                if isinstance(plan, SizePlan):  # refused before the download, not after it
                    check_output_dir(plan.target, inputs=[staging_dir], overwrite=overwrite)
                    plan.overwrite = overwrite
            fetcher.fetch_all([f for plan in todo for f in plan.files])
            for number, plan in enumerate(todo):
                plan.finish(fetcher, remote)
                # Staged files are dropped once placed, unless a later output takes the same bytes.
                later = {f.key for other in todo[number + 1 :] for f in other.files}
                _drop_staged(fetcher, [f for f in plan.files if f.key not in later])


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


# ---- source local: verify an existing copy, then link it ----------------------------------------


def llama_from_local(
    *,
    path: Path | None,
    dirs: list[str],
    tokenizer_only: bool,
    folder: Path,
    link: bool,
    include_tokenizer: bool,
    jobs: int,
    overwrite: bool = False,
) -> Path:
    """Verify an existing pyllama-layout copy (or one size folder) against its checklists, then link it into place."""
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
        _check_local_size(name, src)
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
        inputs = [src, tokenizer_dir / "tokenizer.model" if tokenizer_dir else None]
        if (folder / name).resolve() != src.resolve():  # refused before the (long) verification
            check_output_dir(folder / name, inputs=inputs, overwrite=overwrite)
        _verify_local(to_check, jobs)
        target = folder / name
        if target.resolve() == src.resolve():
            log.info("%s: already in place; verified", target)
            continue
        with atomic_output_dir(target, inputs=inputs, overwrite=overwrite) as out:
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
                atomic_write_bytes(_inside(folder, n), (tokenizer_dir / n).read_bytes(), provenance=False)
        log.info("%s: tokenizer verified and placed", folder)
    return folder / dirs[0] if dirs else folder


# Llama 2's folders have the (dim, layers) of LLaMA-1's 7B, 13B and 65B.
LLAMA2_SHAPES = {"llama-2-7b": "7b", "llama-2-13b": "13b", "llama-2-70b": "65b"}


def _check_local_size(name: str, src: Path) -> None:
    """A local copy's params.json against the size asked for: a 13B folder taken as 7B would be placed (and later
    converted, merged and named) as 7B. Sizes of unknown shape and unreadable files are left to the checksums."""
    chat = name.endswith("-chat")
    if name in RAW_DIR_TO_SIZE:
        shapes = {s.raw_dir: s for s in SIZES.values()}
    elif name.removesuffix("-chat") in LLAMA2_SHAPES:
        shapes = {k + "-chat" * chat: get_size(v) for k, v in LLAMA2_SHAPES.items()}
    else:
        return
    try:
        params = json.loads((src / "params.json").read_text())
        found = (params["dim"], params["n_layers"])
    except (OSError, ValueError, TypeError, KeyError):
        return
    size = shapes[name]
    if found == (size.dim, size.n_layers):
        return
    other = next((k for k, s in shapes.items() if (s.dim, s.n_layers) == found), None)
    fix = f"--model-size {other}" if other else f"--path the {name} folder"
    raise VicunaflowError(
        f"{src / 'params.json'}: dim {found[0]}, {found[1]} layers: not the {name} release (dim {size.dim}, "
        f"{size.n_layers} layers); give {fix}"
    )


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
