"""Streaming readers and the sharded safetensors writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vicunaflow import VicunaflowError
from vicunaflow.checkpoint import (
    Checkpoint,
    PickleFile,
    SafetensorsFile,
    ShardedSafetensorsWriter,
    TensorInfo,
    parse_size,
)


def some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(64, 32, generator=g).half(),
        "b": torch.randn(100, generator=g).to(torch.bfloat16),
        "c": torch.randn(8, 8, generator=g),
        "d": torch.arange(10, dtype=torch.int64),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5KB", 1500), ("123B", 123), (4200, 4200)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["five gigs", "500", "0GB", "5G"])
def test_parse_size_rejects_nonsense_and_a_missing_unit(text):
    """'500' alone is refused, as transformers refuses it: meant as megabytes, it gave every tensor a shard."""
    with pytest.raises(VicunaflowError, match=r"max shard size .*with a unit"):
        parse_size(text)


def test_writer_shards_and_reads_back(tmp_path):
    tensors = some_tensors()
    plan = [(n, TensorInfo(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, plan, max_shard_size=4200) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert [f.name for f in files[:-1]] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"] == {"a": files[0].name, "b": files[1].name, "c": files[1].name, "d": files[1].name}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, t in tensors.items():  # the official reader agrees
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert torch.equal(f.get_tensor(name), t)
            assert f.metadata() == {"format": "pt"}


def test_writer_checks_the_plan(tmp_path):
    plan = [("a", TensorInfo((2, 2), torch.float16))]
    writer = ShardedSafetensorsWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="before all tensors"):
        writer.close()


def test_pickle_and_safetensors_files_read_the_same(tmp_path):
    tensors = some_tensors()
    torch.save(tensors, tmp_path / "x.bin")
    save_file(tensors, tmp_path / "x.safetensors")
    for f in (
        PickleFile(tmp_path / "x.bin", release_bytes=1),
        SafetensorsFile(tmp_path / "x.safetensors", release_bytes=1),
    ):
        assert sorted(f.names()) == sorted(tensors)
        for name, t in tensors.items():
            assert f.info(name) == TensorInfo(tuple(t.shape), t.dtype)
            assert torch.equal(f.get(name), t)  # release_bytes=1: re-mapped before every read


def test_checkpoint_with_and_without_index(tmp_path):
    tensors = some_tensors()
    torch.save({k: tensors[k] for k in "ab"}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: tensors[k] for k in "cd"}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with Checkpoint(tmp_path) as ck:
        assert ck.names() == ["a", "b", "c", "d"]
        assert torch.equal(ck.get("c"), tensors["c"])
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00001-of-00002.bin"}
    weight_map |= {"c": "pytorch_model-00002-of-00002.bin", "d": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert Checkpoint(tmp_path).names() == ["a", "b", "c", "d"]
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(VicunaflowError, match="missing files"):
        Checkpoint(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(VicunaflowError, match=r"no model\.safetensors"):
        Checkpoint(tmp_path)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    tensors = some_tensors()
    save_file(tensors, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VicunaflowError, match=r"t\.safetensors: not a complete safetensors file"):
        SafetensorsFile(tmp_path / "t.safetensors")
    torch.save(tensors, tmp_path / "t.bin")
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-100])
    with pytest.raises(VicunaflowError, match=r"t\.bin: truncated"):
        PickleFile(tmp_path / "t.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(VicunaflowError, match="empty file"):
        PickleFile(tmp_path / "empty.bin")
    torch.save({"a": torch.zeros(1), "optimizer": {"lr": 0.1}}, tmp_path / "mixed.bin")
    with pytest.raises(VicunaflowError, match="holds more than tensors"):
        PickleFile(tmp_path / "mixed.bin")


def test_legacy_torch_format_still_reads(tmp_path):
    tensors = some_tensors()
    torch.save(tensors, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    f = PickleFile(tmp_path / "old.bin")
    assert torch.equal(f.get("a"), tensors["a"])


def test_pickle_reader_keeps_few_pages_resident_and_data_valid(tmp_path):
    import psutil

    tensors = {f"t{i}": torch.full((1024, 1024), float(i)) for i in range(24)}  # 96 MB
    torch.save(tensors, tmp_path / "big.bin")
    del tensors
    process = psutil.Process()
    f = PickleFile(tmp_path / "big.bin")
    before = process.memory_info().rss
    handed_out = []
    for name in f.names():
        t = f.get(name)
        assert float(t.sum()) == float(name[1:]) * 1024 * 1024  # touches every page
        handed_out.append(t)
    grown_mb = (process.memory_info().rss - before) / 2**20
    assert grown_mb < 24, f"{grown_mb:.0f} MB resident after reading 96 MB"
    assert all(float(t[0, 0]) == float(i) for i, t in enumerate(handed_out))  # dropped pages read back fine
