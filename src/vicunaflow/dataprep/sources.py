"""Where conversation data comes from: a file of a Hugging Face dataset repository (`data fetch`) and
mixes of cleaned sets with weights (`data mix`).

`data fetch` is `download hf` (resumable, every file checked against the Hub's hash, the commit
recorded) narrowed to one file of a dataset repository, plus an optional sha256 pin: a branch or tag
can move, and a pinned sha256 fails loudly when the file is no longer the one the config was written
for. The folder appears whole or not at all.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from pathlib import Path, PurePosixPath

from vicunaflow import VicunaflowError, first_few
from vicunaflow.dataprep.records import (
    Broken,
    Counts,
    atomic_writer,
    content_digest,
    conversation_id,
    dumps,
    read_records,
    record_name,
    unit_hash,
)
from vicunaflow.outputs import check_output_files

log = logging.getLogger(__name__)

COMMIT = re.compile(r"[0-9a-f]{40}")


def fetch(
    *,
    repo: str,
    file: str,
    output_dir: Path,
    revision: str | None = None,
    sha256: str | None = None,
    endpoint: str | None = None,
    token_env: str = "HF_TOKEN",
    staging_dir: Path = Path(".staging"),
    overwrite: bool = False,
) -> Path:
    """Fetch one file of a Hugging Face dataset repository at a pinned revision, verified.

    The file is checked against the Hub's hash and, when given, a sha256 of your own;
    `<output_dir>/vicunaflow.json` records the repository, the commit fetched and the file's hashes.

    Arguments:
        repo: dataset repository id, e.g. anon8231489123/ShareGPT_Vicuna_unfiltered.
        file: the file's path in the repository, e.g. ShareGPT_V3_unfiltered_cleaned_split.json.
        output_dir: folder to write (the file keeps its path inside it); written whole or not at all.
        revision: commit (best: it cannot move), tag or branch; default: main, with a warning.
        sha256: the file's expected sha256; a file that differs is refused, naming both hashes.
        endpoint: Hub URL; default: $HF_ENDPOINT or https://huggingface.co.
        token_env: environment variable holding a Hub token for gated or private datasets.
        staging_dir: partial downloads, outside any output; a rerun continues from here.
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    from vicunaflow.download import download_hf
    from vicunaflow.download.hub import HubUnavailable, NoFileMatches
    from vicunaflow.outputs import atomic_output_dir, check_output_dir, sha256_file, write_manifest

    output_dir = Path(output_dir)
    log.info(
        "data fetch: %s file %s at %s into %s; sha256 %s", repo, file, revision or "main", output_dir, sha256 or "-"
    )
    pure = PurePosixPath(file)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise VicunaflowError(f"{repo}: file {file!r}: give a path inside the repository")
    names_a_folder = file.endswith("/")
    if revision is None or not COMMIT.fullmatch(revision):
        log.warning(
            "%s: revision %s can move; pin a 40-hex commit (or a sha256) so reruns fetch the same bytes",
            repo,
            revision or "main",
        )
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise VicunaflowError(f"--sha256 {sha256!r}: give 64 lowercase hex digits")
    staging_dir = Path(staging_dir)
    check_output_dir(output_dir, inputs=[staging_dir], overwrite=overwrite)  # before any download
    with atomic_output_dir(output_dir, inputs=[staging_dir], overwrite=overwrite) as out:
        fetched = out / "hub"
        try:
            download_hf(
                repo=repo,
                repo_type="dataset",
                revision=revision,
                # Exactly this file: huggingface_hub reads a pattern ending in "/" as the whole folder. A --file
                # ending in "/" is excluded too, so nothing is fetched and the error below lists what the folder holds.
                include=[glob.escape(pure.as_posix())],
                exclude=[glob.escape(pure.as_posix())] if names_a_folder else None,
                local_dir=fetched,
                endpoint=endpoint,
                token_env=token_env,
                staging_dir=staging_dir,
                jobs=1,
            )
        except HubUnavailable as err:  # its way around, --source local --path, is download hf's: data fetch has none
            raise VicunaflowError(f"{err.problem}, or, {without_the_hub(file)}") from None
        except NoFileMatches as err:
            files = ", ".join(err.files)
            under = [name for name in err.files if name.startswith(f"{pure.as_posix()}/")]
            if under or names_a_folder:
                raise VicunaflowError(folder_error(repo, revision, file, under, files)) from None
            raise VicunaflowError(
                f"{repo}@{revision or 'main'}: no file {file!r} in this dataset repository"
                + (f"; it has: {files}" if files else "")
            ) from None
        path = fetched / file
        actual = sha256_file(path)
        if sha256 is not None and actual != sha256:
            raise VicunaflowError(
                f"{repo}@{revision or 'main'}: {file}: sha256 mismatch: expected {sha256} (config), got {actual}; "
                "the file changed at this revision or the pin is wrong; nothing was written"
            )
        provenance = json.loads((fetched / "vicunaflow.json").read_text())
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, out / file)
        (fetched / "vicunaflow.json").unlink()
        _remove_empty_dirs(fetched)
        keep = ("repo", "repo_type", "revision", "requested_revision", "endpoint", "files")
        write_manifest(out, file=file, sha256=actual, **{k: provenance[k] for k in keep if k in provenance})
    log.info("%s: %s at commit %s, sha256 %s", output_dir, file, provenance.get("revision"), actual)
    return output_dir / file


def folder_error(repo: str, revision: str | None, file: str, under: list[str], files: str) -> str:
    """The error for a --file that names a folder (`data/`, or `data` where the repository has `data/...`): data fetch
    takes one file, so it names the files under it, each a --file of its own. huggingface_hub fetched every file of
    the folder, and the fetch then failed on the folder with "[Errno 21] Is a directory" and a temporary path."""
    where = f"{repo}@{revision or 'main'}"
    if not under:
        return f"{where}: --file {file!r} names a folder, and the repository has none of that name; it has: {files}"
    return (
        f"{where}: --file {file!r} is a folder; data fetch takes one file: give one of the {len(under)} files "
        f"under it as --file (one data fetch, or one dataset, each): {first_few(under, 20)}"
    )


def without_the_hub(file: str) -> str:
    """What to do when the Hub cannot give `file`: clean a copy at hand, the step after fetch (the workflow: the
    dataset's `path` instead of `hub`)."""
    name = PurePosixPath(file).name
    cleaned = name.removesuffix(".jsonl").removesuffix(".json") + ".clean.jsonl"
    return (
        f"with a copy of {name} at hand, skip the fetch: `vicunaflow data clean --data {name} --output {cleaned}` "
        f"(in the workflow's config: the dataset's `path: {name}` instead of its `hub`)"
    )


def _remove_empty_dirs(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    root.rmdir()


def mix(
    *,
    data: list[Path],
    weights: list[float],
    output: Path,
    names: list[str] | None = None,
    seed: str = "vicunaflow",
    report: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Mix cleaned conversation sets into one, each with a weight; ids become `<name>/<id>`.

    A weight w keeps floor(w) copies of every conversation of its set, and one more for a share
    frac(w) of them, picked by a hash of the seed and the id (0.5: half the set; 2: every
    conversation twice; the same ones every run). Copies after the first are `<name>/<id>/<k>`;
    all copies share `origin` = `<name>/<id>`, so `data split` holds them out together. A conversation
    already taken from an earlier set (same system prompt and turns) is dropped as a duplicate.

    Arguments:
        data: cleaned JSONL files (`data clean` outputs), in mixing order.
        weights: one weight per file, >= 0.
        output: the mixed JSONL, written to a temporary and renamed into place.
        names: one name per file, used in ids; default: each file's name without .jsonl.
        seed: mixed into the sampling hash.
        report: TSV of conversations read, taken, dropped per set; default: the output's name with `.counts.tsv`.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    data, output = [Path(d) for d in data], Path(output)
    names = names or [d.name.removesuffix(".jsonl") for d in data]
    if not (len(data) == len(weights) == len(names)) or not data:
        raise VicunaflowError(
            f"data mix: {len(data)} files, {len(weights)} weights and {len(names)} names: give one weight and name per file"
        )
    if len(set(names)) != len(names):
        raise VicunaflowError(f"data mix: names must differ: {names}")
    for weight in weights:
        if not (weight >= 0 and math.isfinite(weight)):
            raise VicunaflowError(f"data mix: weight {weight}: give a number >= 0")
    if not any(weights):
        raise VicunaflowError(f"data mix: every weight is 0 ({weights}): the mix would hold no conversation")
    report = Path(report) if report else output.with_name(output.name.removesuffix(".jsonl") + ".counts.tsv")
    log.info(
        "data mix: %s into %s, seed %r",
        ", ".join(f"{n}={w} ({d})" for n, w, d in zip(names, weights, data, strict=True)),
        output,
        seed,
    )
    check_output_files({"--output": output, "--report": report}, inputs=data, overwrite=overwrite)
    counts = Counts("mix")
    seen: set[bytes] = set()
    with atomic_writer(output) as out:
        for path, weight, name in zip(data, weights, names, strict=True):
            whole, share = int(weight), weight - int(weight)
            for where, record in read_records(path):
                counts.add("read", name)
                label = f"{name}: {record_name(where, record)}"
                if (
                    isinstance(record, Broken)
                    or not isinstance(record, dict)
                    or not isinstance(record.get("conversations"), list)
                    or conversation_id(record) is None
                ):
                    counts.add("drop", "not_a_conversation", label)
                    continue
                digest = content_digest(record)
                if digest in seen:
                    counts.add("drop", "duplicate_across_sets", label)
                    continue
                seen.add(digest)
                origin = f"{name}/{record['id']}"
                copies = whole + (1 if share and unit_hash(seed, origin) < share else 0)
                if not copies:
                    counts.add("drop", f"not_sampled:{name}", None)
                for k in range(copies):
                    mixed = {"id": origin if k == 0 else f"{origin}/{k}", "origin": origin}
                    mixed |= {key: value for key, value in record.items() if key not in ("id", "origin")}
                    out.write(dumps(mixed))
                    counts.add("kept", name)
        if not any(kind == "kept" for kind, _ in counts.counts):  # inside the writer: no empty mix left as if done
            raise VicunaflowError(empty_mix(data, counts))
    counts.write_tsv(report)
    log.info("data mix: wrote %s and %s", output, report)
    return output


def empty_mix(data: list[Path], counts: Counts) -> str:
    """The error for a mix that took no conversation, with the fix for what left every one out."""
    read = sum(n for (kind, _), n in counts.counts.items() if kind == "read")
    if not read:
        return f"data mix: {', '.join(map(str, data))}: no conversation in them; give `vicunaflow data clean` outputs"
    drops = [(reason, n) for kind, reason, n, _ in counts.rows() if kind == "drop"]
    if all(reason.startswith("not_sampled:") for reason, _ in drops):
        fix = "raise the weights (a weight below 1 takes that share of a set, the same conversations every run)"
    else:
        fix = "give `vicunaflow data clean` outputs"
    dropped = ", ".join(f"{reason} {n}" for reason, n in drops)
    return f"data mix: the mix holds no conversation (read {read}; dropped: {dropped}); {fix}"
