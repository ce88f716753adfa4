"""apply-delta / make-delta: exact sums, byte-exact round trips, either file format, clear mismatch errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vicunaflow import VicunaflowError
from vicunaflow.delta import add_delta, apply_delta, exact_delta, make_delta


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, read the plain way (whole files)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    for path in sorted(directory.glob("*.bin")):
        tensors |= torch.load(path, weights_only=True)
    return tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def save_as_bin(tensors: dict[str, torch.Tensor], directory: Path, like: Path) -> Path:
    """A copy of a model in the pickled pytorch_model-0000N-of-0000M.bin layout, two shards."""
    directory.mkdir()
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: tensors[n].clone() for n in half}, directory / file)
        weight_map |= dict.fromkeys(half, file)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(like / name, directory / name)
    return directory


def test_target_is_float32_sum_cast_back(tiny_hf, tiny_delta, tiny_vicuna):
    base, delta, target = read_tensors(tiny_hf), read_tensors(tiny_delta), read_tensors(tiny_vicuna)
    assert base.keys() == delta.keys() == target.keys()
    for name in base:
        expected = (base[name].float() + delta[name].float()).to(torch.float16)
        assert target[name].dtype == torch.float16
        assert torch.equal(bits(target[name]), bits(expected)), name


def test_target_has_config_tokenizer_and_chat_template(tiny_delta, tiny_vicuna):
    from transformers import AutoTokenizer

    config = json.loads((tiny_vicuna / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    tokenizer = AutoTokenizer.from_pretrained(tiny_vicuna)
    assert tokenizer.chat_template
    assert (tiny_vicuna / "tokenizer.model").read_bytes() == (tiny_delta / "tokenizer.model").read_bytes()
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False).endswith("USER: Hi ASSISTANT:")


def test_make_delta_then_apply_gives_the_same_bytes(tmp_path, tiny_hf, tiny_vicuna):
    delta = make_delta(base=tiny_hf, target=tiny_vicuna, delta=tmp_path / "delta")
    assert {t.dtype for t in read_tensors(delta).values()} == {torch.float32}
    again = apply_delta(base=tiny_hf, delta=delta, target=tmp_path / "again")
    files = sorted(p.name for p in tiny_vicuna.glob("*.safetensors"))
    assert files == sorted(p.name for p in again.glob("*.safetensors"))
    for name in [*files, "model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (again / name).read_bytes() == (tiny_vicuna / name).read_bytes(), name


def test_bin_base_and_safetensors_delta(tmp_path, tiny_hf, tiny_delta, tiny_vicuna):
    """Formats mix freely: a .bin base with a safetensors delta gives the same target."""
    bin_base = save_as_bin(read_tensors(tiny_hf), tmp_path / "base-bin", like=tiny_hf)
    st_delta = make_delta(base=tiny_hf, target=tiny_vicuna, delta=tmp_path / "delta-st")
    target = apply_delta(base=bin_base, delta=st_delta, target=tmp_path / "target")
    expected = read_tensors(tiny_vicuna)
    for name, tensor in read_tensors(target).items():
        assert torch.equal(bits(tensor), bits(expected[name])), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_delta_round_trips_fine_tune_like_changes(dtype):
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(200, 300, generator=generator) * 0.02).to(dtype)
    # A fine-tune: small updates, some weights pushed to zero or through it, a few big moves.
    target = base.float() + torch.randn(200, 300, generator=generator) * 1e-3
    target[:5] = 0.0
    target[5:10] = -base[5:10].float() * 1e-3  # float16: some underflow to -0.0 (where base > 0)
    target[10:12] *= 50
    target = target.to(dtype)
    delta = exact_delta(base, target)
    acc = torch.float64 if dtype == torch.float32 else torch.float32
    assert delta.dtype == acc
    assert torch.equal(bits((base.to(acc) + delta).to(dtype)), bits(target))
    assert torch.equal(exact_delta(base, target, chunk=997), delta)


def test_negative_zero_targets_are_reached():
    base = torch.tensor([0.02, 2.8e-5, -0.1], dtype=torch.float16)
    target = torch.tensor([-0.0, -0.0, -0.0], dtype=torch.float16)
    delta = exact_delta(base, target)
    assert torch.equal(bits((base.float() + delta).half()), bits(target))


def test_a_same_dtype_delta_would_not_round_trip():
    """Why deltas are float32: the float16 difference loses weights pushed through zero."""
    base = torch.tensor([0.02, 0.5, -0.03], dtype=torch.float16)
    target = torch.tensor([-1e-5, 3e-4, 2e-5], dtype=torch.float16)
    half_delta = (target.float() - base.float()).half()
    assert not torch.equal((base.float() + half_delta.float()).half(), target)
    assert torch.equal((base.float() + exact_delta(base, target)).half(), target)


@pytest.mark.parametrize(
    ("dtype", "b", "t"),
    [(torch.float16, 2.0, 2.0**-24), (torch.float16, 4.0, 2.0**-14 + 2.0**-24), (torch.bfloat16, 0.02, 1e-9)],
)
def test_exact_delta_refuses_an_unreachable_target(dtype, b, t):
    base, target = torch.tensor([0.1, b], dtype=dtype), torch.tensor([0.1, t], dtype=dtype)
    with pytest.raises(VicunaflowError, match=r"w: 1 values cannot be reached .*element 1"):
        exact_delta(base, target, "w")


def test_v0_delta_gets_its_own_message(tmp_path, tiny_hf, tiny_delta):
    delta = tmp_path / "v0"
    shutil.copytree(tiny_delta, delta)
    for shard in delta.glob("*.bin"):
        state = torch.load(shard, weights_only=True)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in state:  # one extra row: the pad token v0 added
                state[name] = torch.cat([state[name], state[name][:1]])
        torch.save(state, shard)
    with pytest.raises(VicunaflowError) as err:
        apply_delta(base=tiny_hf, delta=delta, target=tmp_path / "out")
    assert "v0 delta" in str(err.value) and "v1.1" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("field", "change"), [("num_hidden_layers", -1), ("vocab_size", 1024)])
def test_a_config_that_contradicts_its_tensors_is_refused_before_writing(tmp_path, tiny_hf, tiny_delta, field, change):
    """apply-delta copies the delta's config.json and make-delta the target's: one that does not describe their
    tensors (a layer count or vocabulary off) is refused, not written into an output marked complete."""
    delta = tmp_path / "delta"
    shutil.copytree(tiny_delta, delta)
    config = json.loads((delta / "config.json").read_text())
    config[field] += change
    (delta / "config.json").write_text(json.dumps(config))
    with pytest.raises(VicunaflowError, match="config"):
        apply_delta(base=tiny_hf, delta=delta, target=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(VicunaflowError, match="config"):
        make_delta(base=tiny_hf, target=delta, delta=tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_mismatched_names_are_listed(tmp_path, tiny_hf, tiny_delta):
    delta = tmp_path / "renamed"
    shutil.copytree(tiny_delta, delta)
    index = json.loads((delta / "pytorch_model.bin.index.json").read_text())
    shard = delta / index["weight_map"]["model.norm.weight"]
    state = torch.load(shard, weights_only=True)
    state["model.final_norm.weight"] = state.pop("model.norm.weight")
    shrunk = next(n for n in state if n.endswith("up_proj.weight"))
    state[shrunk] = state[shrunk][:-1].clone()
    torch.save(state, shard)
    index["weight_map"]["model.final_norm.weight"] = index["weight_map"].pop("model.norm.weight")
    (delta / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(VicunaflowError) as err:
        apply_delta(base=tiny_hf, delta=delta, target=tmp_path / "out")
    message = str(err.value)
    assert "model.norm.weight" in message and "model.final_norm.weight" in message and shrunk in message
    assert not (tmp_path / "out").exists()


def test_truncated_delta_shard_names_the_file(tmp_path, tiny_hf, tiny_delta):
    delta = tmp_path / "truncated"
    shutil.copytree(tiny_delta, delta)
    shard = sorted(delta.glob("*.bin"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(VicunaflowError, match=str(shard)):
        apply_delta(base=tiny_hf, delta=delta, target=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fastchat_flag_names(tmp_path, tiny_hf, tiny_delta, tiny_vicuna):
    target = tmp_path / "via-cli"
    result = subprocess.run(
        [sys.executable, "-m", "vicunaflow", "apply-delta", "--base-model-path", str(tiny_hf),
         "--delta-path", str(tiny_delta), "--target-model-path", str(target)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shard = "model-00001-of-00001.safetensors"
    assert (target / shard).read_bytes() == (tiny_vicuna / shard).read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "vicunaflow", "make-delta", "--base-model-path", str(tiny_hf),
         "--target-model-path", str(target), "--delta-path", str(tmp_path / "delta")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "delta" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("delta_dtype", ["same", torch.float32])
def test_add_delta_is_the_float32_formula(dtype, delta_dtype):
    """The one-pass 16-bit add and the chunked path both equal dtype(float32(b) + float32(d)) bit for bit."""
    generator = torch.Generator().manual_seed(1)
    n = 1_000_003
    base = (torch.randn(n, generator=generator) * 0.02).to(dtype)
    delta = torch.randn(n, generator=generator) * torch.logspace(-8, 2, n)  # tiny to huge
    delta = delta.to(dtype if delta_dtype == "same" else delta_dtype)
    edges = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 0.0, -0.0, 1.0, -1.0])
    base[:8], delta[:8] = edges.to(dtype), edges.flip(0).to(delta.dtype)
    expected = (base.float() + delta.float()).to(dtype)
    assert torch.equal(bits(add_delta(base, delta, dtype)), bits(expected))
    assert torch.equal(bits(add_delta(base, delta, dtype, chunk=4099)), bits(expected))


def test_a_model_given_as_the_delta_or_a_delta_as_the_base_is_refused(tmp_path, tiny_hf, tiny_delta, tiny_vicuna):
    """These were merged without a word: base + base (or + a merged Vicuna) is a target of doubled weights that
    loads and chats; a swapped --base/--delta, or a delta as make-delta's --target, gives another wrong folder."""
    cases = [
        (dict(base=tiny_hf, delta=tiny_hf), f"--base and --delta are both {tiny_hf}"),
        (dict(base=tiny_hf, delta=tiny_vicuna), f"{tiny_vicuna}: a full model"),
        (
            dict(base=tiny_delta, delta=tiny_hf),
            f"{tiny_delta}: a Vicuna delta (its vicunaflow.json says so), given as --base",
        ),
    ]
    for folders, fragment in cases:
        with pytest.raises(VicunaflowError, match=re.escape(fragment)):
            apply_delta(**folders, target=tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(
        VicunaflowError,
        match=re.escape(f"{tiny_delta}: a Vicuna delta (its vicunaflow.json says so), given as --target"),
    ):
        make_delta(base=tiny_hf, target=tiny_delta, delta=tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_a_raw_checkpoint_or_a_hub_id_gets_the_step_before(tmp_path, tiny_raw, tiny_hf, tiny_delta, monkeypatch):
    """Not "no model.safetensors / pytorch_model.bin weights found" nor "not a directory": the step to run first."""
    with pytest.raises(VicunaflowError, match=re.escape(f"{tiny_raw}: a raw Meta checkpoint")) as err:
        apply_delta(base=tiny_raw, delta=tiny_delta, target=tmp_path / "out")
    assert f"vicunaflow convert --input-dir {tiny_raw}" in str(err.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VicunaflowError) as err:  # FastChat's apply_delta took Hub ids
        apply_delta(base=tiny_hf, delta=Path("lmsys/vicuna-7b-delta-v1.1"), target=tmp_path / "out")
    assert "vicunaflow download hf --repo lmsys/vicuna-7b-delta-v1.1" in str(err.value)
    (tmp_path / "d").mkdir()
    with pytest.raises(VicunaflowError, match=r"d: no config.json; give --delta a Hugging Face model folder"):
        apply_delta(base=tiny_hf, delta=Path("d"), target=tmp_path / "out")  # was: "(--model-path)", not its flag
    assert not (tmp_path / "out").exists()


def test_a_lost_shard_of_a_folder_without_index_is_named(tmp_path, tiny_hf, tiny_delta):
    """Was: "does not match ...: only in <base>: model.layers.2..." (the tensors of the lost file, not the file)."""
    delta = tmp_path / "delta"
    shutil.copytree(tiny_delta, delta)
    (delta / "pytorch_model.bin.index.json").unlink()
    (delta / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(VicunaflowError) as err:
        apply_delta(base=tiny_hf, delta=delta, target=tmp_path / "out")
    assert f"{delta}: pytorch_model-00002-of-00002.bin missing" in str(err.value)
    assert "pytorch_model-00001-of-00002.bin says there are 2 shards" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_delta_or_target_without_tokenizer_is_refused_before_any_tensor_is_summed(
    tmp_path, tiny_hf, tiny_delta, tiny_vicuna, monkeypatch
):
    """A delta folder missing its tokenizer was found out only after every tensor was summed and written (a
    13B apply-delta: the whole run lost); make-delta's --target likewise after every delta was computed."""
    from vicunaflow import delta as delta_module

    def summed(*args, **kwargs):
        raise AssertionError("tensors were read before the tokenizer was checked")

    monkeypatch.setattr(delta_module, "add_delta", summed)
    monkeypatch.setattr(delta_module, "exact_delta", summed)
    for folder, call in (
        (tiny_delta, lambda copy: apply_delta(base=tiny_hf, delta=copy, target=tmp_path / "target")),
        (tiny_vicuna, lambda copy: make_delta(base=tiny_hf, target=copy, delta=tmp_path / "delta")),
    ):
        copy = tmp_path / f"{folder.name}-no-tokenizer"
        shutil.copytree(folder, copy)
        for name in ("tokenizer.model", "tokenizer.json"):
            (copy / name).unlink(missing_ok=True)
        with pytest.raises(VicunaflowError, match=rf"{re.escape(str(copy))}: no tokenizer.model or tokenizer.json"):
            call(copy)
    assert not (tmp_path / "target").exists() and not (tmp_path / "delta").exists()
