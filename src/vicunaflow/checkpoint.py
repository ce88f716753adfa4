"""Streaming tensor readers and a streaming safetensors writer, so no verb ever holds a whole model.

Readers cover Meta's `consolidated.NN.pth`, Hugging Face's pickled `pytorch_model*.bin` shards
(both through `torch.load(mmap=True, weights_only=True)`: nothing but tensors is unpickled) and
safetensors (`safe_open`). Files are memory-mapped, so a tensor costs RAM only while it is used;
but pages read through a mapping stay resident (and count in RSS) until they are dropped. So a
pickle reader tells the kernel it no longer needs the pages of the tensors it handed out before
(madvise DONTNEED: the mapping is private and never written, so a later read simply faults the
file's bytes back in), and a safetensors reader re-opens its file after `release_bytes`.
`Checkpoint` gives one name -> tensor view over a directory of shards, with or without an
index json. `ShardedSafetensorsWriter` writes tensors straight to disk: the plan of names, shapes
and dtypes is known up front, so each shard's header is written first and no shard is buffered.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import mmap
import os
import re
import struct
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vicunaflow import VicunaflowError

log = logging.getLogger(__name__)

RELEASE_BYTES = 128 << 20  # re-open a safetensors file after this many bytes were read through it
MADV_DONTNEED = 4  # Linux, <sys/mman.h>

# safetensors dtype names <-> torch dtypes.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {dtype: name for name, dtype in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class TensorFile:
    """One file of named tensors: `names()`, `info(name)`, `get(name)`, keeping few pages resident."""

    def __init__(self, path: str | os.PathLike, release_bytes: int = RELEASE_BYTES):
        self.path = Path(path)
        self.release_bytes = release_bytes
        self._infos: dict[str, TensorInfo] = {}
        self._open()  # fail early, naming the file, if it is truncated or not a checkpoint

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor; it stays valid however long it is kept (it may be a view of the mapped file)."""
        if name not in self._infos:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if not self._is_open():
            self._open()
        return self._get(name)

    def release(self) -> None:
        """Drop the mapping (its pages go once the tensors handed out are freed)."""
        self._close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # Subclasses implement these.
    def _open(self) -> None:
        raise NotImplementedError

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class PickleFile(TensorFile):
    """A torch.save'd dict of tensors (Meta .pth, Hugging Face .bin), memory-mapped, weights only."""

    _state: dict[str, torch.Tensor] | None = None
    _mapped = False
    _handed_out: list[torch.Tensor]

    def _open(self) -> None:
        self._state, self._mapped = load_pickled_tensors(self.path)
        self._handed_out = []
        if not self._infos:
            self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._state.items()}

    def file_spans(self) -> dict[str, tuple[int, int]] | None:
        """name -> [start, end) bytes of its storage inside the file; None when they cannot be known.

        torch.load(mmap=True) maps the whole file once and slices every storage out of it, so a
        storage's offset in the file is its address minus the mapping's; the zip records
        (data/0, data/1, ...) give the file offset of the lowest one. Lets a caller hash the file
        in order as far as tensors were read (convert's checklist), without a second pass.
        """
        if not self._mapped:
            return None
        if not self._is_open():
            self._open()
        try:
            reader = torch._C.PyTorchFileReader(str(self.path))
            records = [r for r in reader.get_all_records() if re.fullmatch(r"(.*/)?data/\d+", r)]
            first_record = min(reader.get_record_offset(r) for r in records)
        except Exception:  # another layout: the caller falls back to reading the file whole
            return None
        storages = {name: tensor.untyped_storage() for name, tensor in self._state.items()}
        if not storages:
            return {}
        base = min(s.data_ptr() for s in storages.values()) - first_record
        spans = {name: (s.data_ptr() - base, s.data_ptr() - base + s.nbytes()) for name, s in storages.items()}
        size = self.path.stat().st_size
        return spans if all(0 <= start <= end <= size for start, end in spans.values()) else None

    def _is_open(self) -> bool:
        return self._state is not None

    def _get(self, name: str) -> torch.Tensor:
        for tensor in self._handed_out:
            _drop_resident_pages(tensor)
        tensor = self._state[name]
        self._handed_out = [tensor] if self._mapped else []  # only file-backed pages may be dropped
        return tensor

    def _close(self) -> None:
        self._state = None
        self._handed_out = []


class SafetensorsFile(TensorFile):
    """A .safetensors file through `safe_open`, re-opened every `release_bytes` so read pages do not pile up."""

    _handle = None

    def _open(self) -> None:
        from safetensors import SafetensorError, safe_open

        _check_exists(self.path)
        self._read_since_open = 0
        try:
            self._handle = safe_open(self.path, framework="pt")
            if not self._infos:
                for name in self._handle.offset_keys():  # file order, not sorted
                    sl = self._handle.get_slice(name)
                    self._infos[name] = TensorInfo(tuple(sl.get_shape()), ST_DTYPES[sl.get_dtype()])
        except SafetensorError as err:
            raise VicunaflowError(
                f"{self.path}: not a complete safetensors file, truncated or corrupt ({err}); re-run the step that "
                "wrote it (download it again, or convert, apply-delta or quantize again)"
            ) from err

    def _is_open(self) -> bool:
        return self._handle is not None

    def _get(self, name: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(name)  # pages read stay resident until re-opened
        self._read_since_open += tensor.numel() * tensor.element_size()
        if self._read_since_open >= self.release_bytes:
            self._close()
        return tensor

    def _close(self) -> None:
        self._handle = None  # safe_open unmaps when its handle is freed


def open_tensor_file(path: str | os.PathLike, release_bytes: int = RELEASE_BYTES) -> TensorFile:
    path = Path(path)
    cls = SafetensorsFile if path.suffix == ".safetensors" else PickleFile
    return cls(path, release_bytes)


def load_pickled_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """torch.load a flat {name: tensor} pickle, weights-only, with errors naming the file; and whether it is mapped."""
    path = Path(path)
    _check_exists(path)
    mapped = True
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        if "_use_new_zipfile_serialization" not in str(err):
            raise _unreadable(path, err) from err
        log.warning("%s: old torch.save format, cannot memory-map it; loading it whole", path)
        mapped = False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err2:
            raise _unreadable(path, err2) from err2
    if not isinstance(state, dict):
        raise VicunaflowError(f"{path}: expected a dict of tensors, found a {type(state).__name__}")
    others = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise VicunaflowError(f"{path}: holds more than tensors: {', '.join(map(str, others[:5]))}; not a weights file")
    return state, mapped


def _drop_resident_pages(tensor: torch.Tensor) -> None:
    """madvise(DONTNEED) the whole pages inside a file-mapped tensor: RSS falls, the data stays readable."""
    libc = _libc()
    if libc is None:
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    start, end = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        libc.madvise(start, end - start, MADV_DONTNEED)


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None  # elsewhere pages stay until the mapping is dropped
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _unreadable(path: Path, err: Exception) -> VicunaflowError:
    if "Weights only load failed" in str(err):  # the pickle would build objects or run code
        return VicunaflowError(f"{path}: holds more than tensors, refusing to unpickle it: {_first_line(err)}")
    return VicunaflowError(f"{path}: truncated or corrupt checkpoint ({_first_line(err)}); download it again")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise VicunaflowError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VicunaflowError(f"{path}: empty file (an interrupted download?)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # torch's weights_only message is pages long; its first sentence and the "Unsupported global" line matter.
    globals_line = re.search(r"(Unsupported global:[^\n]*|Unsupported operand[^\n]*)", text)
    first = text.splitlines()[0] if text else type(err).__name__
    return f"{first} {globals_line.group(1)}" if globals_line else first


# --------------------------------------------------------------------------------------------
# A Hugging Face checkpoint directory


WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")  # safetensors preferred when both exist
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Checkpoint:
    """All tensors of a Hugging Face model directory (safetensors or .bin shards, index or not)."""

    def __init__(self, directory: str | os.PathLike, release_bytes: int = RELEASE_BYTES):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise VicunaflowError(f"{self.directory}: not a directory")
        self.files = [open_tensor_file(p, release_bytes) for p in _weight_files(self.directory)]
        self._file_of: dict[str, TensorFile] = {}
        for f in self.files:
            for name in f.names():
                if name in self._file_of:
                    raise VicunaflowError(f"{f.path}: tensor {name} also in {self._file_of[name].path}")
                self._file_of[name] = f

    def names(self) -> list[str]:
        return list(self._file_of)

    def info(self, name: str) -> TensorInfo:
        return self._file_of[name].info(name)

    def get(self, name: str) -> torch.Tensor:
        return self._file_of[name].get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def release(self) -> None:
        for f in self.files:
            f.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _weight_files(directory: Path) -> list[Path]:
    """Weight files of a model directory: those its index names, else safetensors, else .bin."""
    for index_name in INDEX_FILES:
        index_path = directory / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise VicunaflowError(f"{index_path}: not a valid index ({err})") from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise VicunaflowError(f"{index_path}: names missing files {', '.join(missing[:3])}")
            return [directory / f for f in files]
    for pattern in WEIGHT_PATTERNS:
        files = sorted(directory.glob(pattern))
        if files:
            _check_numbered_shards(directory, files)
            return files
    raise VicunaflowError(f"{directory}: no model.safetensors / pytorch_model.bin weights found")


def _check_numbered_shards(directory: Path, files: list[Path]) -> None:
    """Without an index, `model-0000N-of-0000M` names still say how many shards there are: name the missing ones
    (else a lost shard shows as tensors "only in" the other model, or a model short of layers)."""
    numbered = [m for f in files if (m := re.fullmatch(r"(.+)-(\d+)-of-(\d+)(\.\w+)", f.name))]
    groups = {(m[1], m[3], m[4]) for m in numbered}
    present = {f.name for f in files}
    for stem, total, suffix in sorted(groups):
        expected = [f"{stem}-{i:0{len(total)}d}-of-{total}{suffix}" for i in range(1, int(total) + 1)]
        missing = [name for name in expected if name not in present]
        if missing:
            seen = next(name for name in expected if name in present)
            raise VicunaflowError(
                f"{directory}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing ({seen} says "
                f"there are {int(total)} shards); download it again, or re-run the step that wrote the folder"
            )


# --------------------------------------------------------------------------------------------
# Writing


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (Hugging Face's convention: GB = 10^9). A string needs
    its unit, as in transformers: `--max-shard-size 500` meant as megabytes would have given every tensor a
    shard of its own; '500B' says bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise VicunaflowError(
            f"max shard size {size!r}: expected a positive number with a unit, e.g. 5GB, 500MB, 2GiB (or 500B: bytes)"
        )
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    return int(number * base**power)


class ShardedSafetensorsWriter:
    """Write planned tensors in order into model-0000N-of-0000M.safetensors + model.safetensors.index.json.

    `plan` lists (name, TensorInfo) in the order `write` will be called. Shards are cut before a
    tensor that would overflow `max_shard_size` (a bigger tensor gets a shard of its own), headers
    are written when a shard is opened and each tensor goes straight to disk: memory use is the
    caller's one tensor, never a shard. The disk write runs in a background thread (file writes
    release the GIL) while the caller computes the next tensor; at most one write is in flight.
    """

    def __init__(
        self, output_dir: str | os.PathLike, plan: Iterable[tuple[str, TensorInfo]], max_shard_size: str | int = "5GB"
    ):
        self.output_dir = Path(output_dir)
        self.plan = list(plan)
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, TensorInfo]]] = [[]]
        size = 0
        for name, info in self.plan:
            if shards[-1] and size + info.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, info))
            size += info.nbytes
        count = len(shards)
        self.shards = [(f"model-{i + 1:05d}-of-{count:05d}.safetensors", entries) for i, entries in enumerate(shards)]
        self.weight_map = {name: file for file, entries in self.shards for name, _ in entries}
        self.total_size = sum(info.nbytes for _, info in self.plan)
        self._next = 0  # index into plan
        self._shard = -1
        self._file = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._pending: Future | None = None  # the write in flight (it holds its tensor alive)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise RuntimeError(f"tensor {name} is not in the plan")
        expected_name, info = self.plan[self._next]
        if name != expected_name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(
                f"writer expected {expected_name} {info.shape} {info.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._file is None or name not in self._shard_names:
            self._open_next_shard()
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # raw little-endian bytes
        self._wait()
        self._pending = self._io.submit(self._file.write, memoryview(data))
        self._next += 1

    def close(self) -> list[Path]:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        if self._next != len(self.plan):
            missing = [name for name, _ in self.plan[self._next : self._next + 3]]
            raise RuntimeError(f"writer closed before all tensors were written (next: {missing})")
        self._close_file()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        index_path = self.output_dir / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        return [self.output_dir / file for file, _ in self.shards] + [index_path]

    def _open_next_shard(self) -> None:
        self._close_file()
        self._shard += 1
        file_name, entries = self.shards[self._shard]
        self._shard_names = {name for name, _ in entries}
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, info in entries:
            header[name] = {
                "dtype": TORCH_TO_ST[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment of the data
        self._file = open(self.output_dir / file_name, "wb")  # noqa: SIM115 (closed in _close_file)
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write (disk full ...)

    def _close_file(self) -> None:
        self._wait()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self._close_file()
        finally:
            self._io.shutdown(wait=True)
