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

Modules: `http` (resumable fetches, retries, redaction), `meta` (pyllama's layout: mirror, Meta's signed
URL, local copies), `hub` (Hugging Face). This file holds the two verbs the CLI runs; each hands a
source to the public, keyword-only entry points of its siblings (`meta.llama_from_mirror`,
`meta.llama_from_local`, `hub.hf_from_hub` with a `hub.HubRepo`, `hub.hf_from_local`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError
from vicunaflow.download.http import redact_url, redacting
from vicunaflow.download.hub import HubRepo, hf_from_hub, hf_from_local
from vicunaflow.download.meta import llama_from_local, llama_from_mirror, parse_checklist, parse_model_sizes, safe_name
from vicunaflow.outputs import check_output_dir

__all__ = ["download_hf", "download_llama", "parse_checklist", "parse_model_sizes", "redact_url", "safe_name"]

log = logging.getLogger(__name__)


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
    overwrite: bool = False,
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
        overwrite: replace a size folder that exists but is neither verified against its checklist nor
            a complete vicunaflow output (default: refuse, before anything is downloaded).
    """
    want_tokenizer_only, dirs = parse_model_sizes(model_size)
    folder, staging_dir = Path(folder), Path(staging_dir)
    if source == "local":
        return llama_from_local(
            path=Path(path) if path else None,
            dirs=dirs,
            tokenizer_only=want_tokenizer_only,
            folder=folder,
            link=link,
            include_tokenizer=include_tokenizer,
            jobs=jobs,
            overwrite=overwrite,
        )

    llama_from_mirror(
        source=source,
        base_url=base_url,
        url=url,
        url_env=url_env,
        dirs=dirs,
        tokenizer=include_tokenizer or want_tokenizer_only,
        folder=folder,
        staging_dir=staging_dir,
        jobs=jobs,
        retries=retries,
        retry_wait=retry_wait,
        timeout=timeout,
        overwrite=overwrite,
    )
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
    overwrite: bool = False,
) -> Path:
    """Fetch a Hugging Face repository at a pinned revision, verify every file, record the commit fetched.

    Used for the Vicuna deltas (lmsys/vicuna-7b-delta-v1.1), pre-converted bases (huggyllama/llama-7b)
    and merged releases (lmsys/vicuna-7b-v1.5). `<local_dir>/vicunaflow.json` records the repository,
    the commit actually fetched and each file's hash. With HF_HUB_OFFLINE=1 the files come from the
    Hugging Face cache (~/.cache/huggingface/hub), without any network access, and only when the cache
    shows every requested file: the commit's cached file listing (kept by `hf download` or
    snapshot_download, not by from_pretrained), or else a cached match for every --include pattern;
    and every shard a weight index names. A partial cache is refused, naming what is missing.

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
        staging_dir: partial downloads, outside any workflow output; a rerun continues from here. Each
            set of files of a commit has its own stage, so fetches of other files can run at once.
        jobs: files downloaded in parallel.
        overwrite: replace a local_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    local_dir, staging_dir = Path(local_dir), Path(staging_dir)
    inputs = [path] if source == "local" else [staging_dir]
    check_output_dir(local_dir, inputs=inputs, overwrite=overwrite)  # before any download
    if source == "local":
        return hf_from_local(path=Path(path) if path else None, local_dir=local_dir, link=link, overwrite=overwrite)
    if not repo:
        raise VicunaflowError("download hf: --repo is required with --source hf (e.g. lmsys/vicuna-7b-delta-v1.1)")
    token = os.environ.get(token_env) or None
    with redacting([token] if token else []):
        return hf_from_hub(
            HubRepo(repo=repo, revision=revision, include=include, exclude=exclude, repo_type=repo_type),
            local_dir=local_dir,
            token=token,
            token_env=token_env,
            endpoint=endpoint,
            staging_dir=staging_dir,
            jobs=jobs,
            overwrite=overwrite,
        )
