"""convert: bit-exact merge + permutation, Meta's forward pass == transformers' on the output, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vicunaflow import VicunaflowError
from vicunaflow.convert import convert
from vicunaflow.formats import meta_names
from vicunaflow.synth import write_raw_checkpoint

# Straight from Meta's model-parallel layout (llama-vicuna-facts.md), kept independent of formats.py.
SPLIT_ON_DIM_1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
REPLICATED = ("attention_norm.weight", "ffn_norm.weight", "norm.weight")


def make_raw(
    root: Path,
    tokenizer: Path,
    *,
    shards=2,
    n_kv_heads=None,
    dtype=torch.float32,
    ffn_dim_multiplier=None,
    rope_theta=None,
) -> Path:
    """A tiny raw checkpoint with the given options, reusing a trained tokenizer (fast)."""
    import sentencepiece as spm

    out = root / "raw"
    out.mkdir(parents=True)
    params = {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
    if n_kv_heads:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    if rope_theta:
        params["rope_theta"] = rope_theta
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    write_raw_checkpoint(out, params, vocab, shards, dtype, seed=3)
    (out / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer, out / "tokenizer.model")
    return out


def read_merged_raw(raw: Path) -> dict[str, torch.Tensor]:
    """Merge Meta's shards the plain way: load everything, concatenate."""
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(raw.glob("consolidated.*.pth"))]
    merged = {}
    for name in shards[0]:
        if name.endswith(REPLICATED):
            merged[name] = shards[0][name]
        else:
            merged[name] = torch.cat([s[name] for s in shards], dim=1 if name.endswith(SPLIT_ON_DIM_1) else 0)
    return merged


def read_hf(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return tensors


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows (2j, 2j+1) of each head -> rows (j, j + head_dim/2), written out index by index."""
    head_dim = w.shape[0] // n_heads
    order = [h * head_dim + 2 * j + parity for h in range(n_heads) for parity in (0, 1) for j in range(head_dim // 2)]
    return w[order]


def meta_forward(state: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's LLaMA forward pass (model.py), in plain float32 torch: interleaved complex rotary."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    head_dim, eps = dim // n_heads, params["norm_eps"]
    theta = params.get("rope_theta", 10000.0)
    T = tokens.shape[0]
    w = {k: v.float() for k, v in state.items()}

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim/2,)
    angles = torch.outer(torch.arange(T).float(), freqs)  # (T, head_dim/2)
    cis = torch.polar(torch.ones_like(angles), angles)  # (T, head_dim/2) complex

    def rotary(x):  # (T, heads, head_dim): consecutive pairs are complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[:, None, :]).flatten(2)

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = w["tok_embeddings.weight"][tokens]  # (T, dim)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        q = rotary((x @ w[p + "attention.wq.weight"].T).view(T, n_heads, head_dim))
        k = rotary((x @ w[p + "attention.wk.weight"].T).view(T, n_kv_heads, head_dim))
        v = (x @ w[p + "attention.wv.weight"].T).view(T, n_kv_heads, head_dim)
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)  # (T, n_heads, head_dim)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5 + mask  # (n_heads, T, T)
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, dim)
        h = h + attn @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["output.weight"].T  # (T, vocab)


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens[None]).logits[0]


@pytest.fixture(scope="module")
def tokenizer_model(tiny_raw) -> Path:
    return tiny_raw / "tokenizer.model"


# ---------------------------------------------------------------------------------------------


def test_output_is_bit_exact_merge_and_permutation(tiny_raw, tiny_hf):
    params = json.loads((tiny_raw / "params.json").read_text())
    raw, hf = read_merged_raw(tiny_raw), read_hf(tiny_hf)
    names = meta_names(params["n_layers"])
    assert set(hf) == {hf_name for hf_name, _ in names.values()}
    for meta, (hf_name, _) in names.items():
        expected = raw[meta]
        if meta.endswith("attention.wq.weight"):
            expected = to_rotate_half(expected, params["n_heads"])
        elif meta.endswith("attention.wk.weight"):
            expected = to_rotate_half(expected, params.get("n_kv_heads") or params["n_heads"])
        assert hf[hf_name].dtype == torch.float16 == expected.dtype, meta
        assert torch.equal(hf[hf_name].view(torch.int16), expected.view(torch.int16)), meta
    config = json.loads((tiny_hf / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    assert config["vocab_size"] == raw["tok_embeddings.weight"].shape[0]


def test_output_layout_and_manifest(tiny_raw, tiny_hf):
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_hf / name).is_file(), name
    index = json.loads((tiny_hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    manifest = json.loads((tiny_hf / "vicunaflow.json").read_text())
    assert str(tiny_raw / "params.json") in manifest["inputs"]
    assert not list(tiny_hf.parent.glob(".llama-tiny-hf.tmp-*"))


@pytest.mark.parametrize(
    "options",
    [
        {"shards": 1},
        {"shards": 2},
        {"shards": 2, "n_kv_heads": 2},  # grouped-query attention, one kv head per shard
        {"shards": 4, "n_kv_heads": 4, "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0},
    ],
    ids=["1-shard", "2-shard", "gqa", "4-shard-ffn-mult-theta"],
)
def test_meta_forward_matches_transformers(tmp_path, tokenizer_model, options):
    raw = make_raw(tmp_path, tokenizer_model, **options)
    out = convert(input_dir=raw, output_dir=tmp_path / "hf")
    params = json.loads((raw / "params.json").read_text())
    tokens = torch.tensor([1, 5, 17, 42, 3, 99, 7, 250, 31, 8])
    expected = meta_forward(read_merged_raw(raw), params, tokens)
    actual = hf_logits(out, tokens)
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


def test_forward_comparison_catches_a_missing_permutation(tmp_path, tokenizer_model):
    """The forward test can fail: q/k left in Meta's order give different logits."""
    raw = make_raw(tmp_path, tokenizer_model, shards=1)
    out = convert(input_dir=raw, output_dir=tmp_path / "hf")
    merged = read_merged_raw(raw)
    params = json.loads((raw / "params.json").read_text())
    tokens = torch.tensor([1, 5, 17, 42, 3, 99])
    unpermuted = dict(merged)
    for name in merged:
        if name.endswith(("wq.weight", "wk.weight")):
            unpermuted[name] = to_rotate_half(merged[name], params["n_heads"])  # a wrong, extra permutation
    assert not torch.allclose(hf_logits(out, tokens), meta_forward(unpermuted, params, tokens), atol=1e-3)


@pytest.mark.parametrize("length", [0, -1])
def test_a_context_below_one_is_refused_before_any_work(tmp_path, tokenizer_model, length):
    raw = make_raw(tmp_path, tokenizer_model)
    with pytest.raises(VicunaflowError, match=f"--max-position-embeddings {length}: must be at least 1"):
        convert(input_dir=raw, output_dir=tmp_path / "hf", max_position_embeddings=length)
    assert not (tmp_path / "hf").exists()


def test_dtype_keep_and_convert(tmp_path, tokenizer_model):
    raw = make_raw(tmp_path, tokenizer_model, dtype=torch.bfloat16)
    kept = read_hf(convert(input_dir=raw, output_dir=tmp_path / "kept"))
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    as_f32 = read_hf(convert(input_dir=raw, output_dir=tmp_path / "f32", dtype="float32"))
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["torch_dtype"] == "float32"
    for name, tensor in kept.items():
        assert as_f32[name].dtype == torch.float32
        assert torch.equal(as_f32[name], tensor.float()), name


def test_max_shard_size_splits_output(tmp_path, tiny_raw, tiny_hf):
    out = convert(input_dir=tiny_raw, output_dir=tmp_path / "hf", max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 6 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    for f in files:  # within the limit, unless one tensor alone is larger
        with safe_open(out / f, "pt") as shard:
            assert (out / f).stat().st_size <= 1_000_000 + 8192 or len(shard.keys()) == 1
    split, whole = read_hf(out), read_hf(tiny_hf)
    assert split.keys() == whole.keys()
    assert all(torch.equal(split[name], whole[name]) for name in whole)


# --- bad input: a clear error naming the file, and no finished-looking output ------------------


def broken_copy(tmp_path: Path, tiny_raw: Path, checklist: bool = False) -> Path:
    """A copy to break; without its checklist.chk unless asked (an edited shard would fail its md5 first)."""
    raw = tmp_path / "tiny"
    shutil.copytree(tiny_raw, raw)
    if not checklist:
        (raw / "checklist.chk").unlink()
    return raw


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def run_convert_cli(raw: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vicunaflow", "convert", "--input-dir", str(raw), "--output-dir", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_shard_differing_from_its_checklist_fails_naming_it(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw, checklist=True)
    shard = raw / "consolidated.01.pth"
    flip_byte(shard, shard.stat().st_size // 2)  # inside a tensor: the file still loads
    result = run_convert_cli(raw, tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert f"{shard}: md5 differs from {raw / 'checklist.chk'}" in result.stderr
    assert "download it again" in result.stderr
    assert "consolidated.00.pth" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_checklist_covers_bytes_after_the_last_tensor_read(tmp_path, tiny_raw):
    """The hash follows the reads, then takes the rest of the file: a change past every tensor is caught too."""
    raw = broken_copy(tmp_path, tiny_raw, checklist=True)
    shard = raw / "consolidated.00.pth"
    reader = torch._C.PyTorchFileReader(str(shard))
    record = next(r for r in reader.get_all_records() if r.endswith("serialization_id"))
    flip_byte(shard, reader.get_record_offset(record))  # read by no one but the checksum
    assert_fails(raw, tmp_path / "out", f"{shard}: md5 differs")
    raw_params = broken_copy(tmp_path / "p", tiny_raw, checklist=True)
    (raw_params / "params.json").write_text((raw_params / "params.json").read_text() + " ")
    assert_fails(raw_params, tmp_path / "out", f"{raw_params / 'params.json'}: md5 differs")


def test_file_spans_locate_each_tensor_in_its_file(tiny_raw):
    from vicunaflow.checkpoint import PickleFile

    shard = PickleFile(tiny_raw / "consolidated.01.pth")
    spans, data = shard.file_spans(), (tiny_raw / "consolidated.01.pth").read_bytes()
    assert set(spans) == set(shard.names())
    for name, (start, end) in spans.items():
        tensor = shard.get(name)
        assert data[start:end] == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name


@pytest.mark.parametrize("checklist", [True, False])
def test_missing_last_shard_is_named(tmp_path, tiny_raw, checklist):
    raw = broken_copy(tmp_path, tiny_raw, checklist=checklist)
    (raw / "consolidated.01.pth").unlink()
    result = run_convert_cli(raw, tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert "consolidated.01.pth missing" in result.stderr
    assert "download it again" in result.stderr
    assert "params.json implies" not in result.stderr
    assert "Traceback" not in result.stderr


def assert_fails(raw: Path, out: Path, *fragments: str, **kwargs) -> None:
    with pytest.raises(VicunaflowError) as err:
        convert(input_dir=raw, output_dir=out, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_params_json(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    (raw / "params.json").unlink()
    assert_fails(raw, tmp_path / "out", str(raw / "params.json"), "missing")


def test_the_pyllama_folder_itself_names_its_size_folders(tmp_path, tiny_raw):
    """transformers' script took --input_dir pyllama_data (with --model_size 7B); here the size folder is given."""
    shutil.copytree(tiny_raw, tmp_path / "pyllama_data" / "tiny")
    assert_fails(
        tmp_path / "pyllama_data",
        tmp_path / "out",
        f"holds the size folders tiny: give --input-dir {tmp_path / 'pyllama_data' / 'tiny'}",
    )


def test_missing_tokenizer(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    (raw / "tokenizer.model").unlink()
    assert_fails(raw, tmp_path / "out", "tokenizer not found", "--tokenizer")


def test_a_tokenizer_folder_is_named_as_a_folder(tmp_path, tiny_raw, capsys):
    """Not "tokenizer not found ... pass --tokenizer" (it was passed): the folder is named, and the file in it."""
    from vicunaflow import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(
            ["convert", "--input-dir", str(tiny_raw), "--tokenizer", str(tiny_raw), "--output-dir", str(tmp_path / "o")]
        )
    assert exit.value.code == 1
    assert (
        f"{tiny_raw} is a folder, not a tokenizer file; give --tokenizer the SentencePiece tokenizer.model file "
        f"itself ({tiny_raw / 'tokenizer.model'})"
    ) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tokenizer_in_parent_or_given(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    shutil.move(raw / "tokenizer.model", tmp_path / "tokenizer.model")  # pyllama's layout
    convert(input_dir=raw, output_dir=tmp_path / "a")
    elsewhere = tmp_path / "elsewhere.model"
    shutil.move(tmp_path / "tokenizer.model", elsewhere)
    convert(input_dir=raw, output_dir=tmp_path / "b", tokenizer=elsewhere)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()


def test_shard_count_not_dividing_heads(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    shutil.copy(raw / "consolidated.01.pth", raw / "consolidated.02.pth")  # 8 heads, 3 shards
    assert_fails(raw, tmp_path / "out", "params.json", "8 heads", "3 shards")


def test_shards_disagree_in_shape(tmp_path, tiny_raw, tokenizer_model):
    raw = broken_copy(tmp_path, tiny_raw)
    state = torch.load(raw / "consolidated.01.pth", weights_only=True)
    original = state["layers.0.attention.wq.weight"]
    state["layers.0.attention.wq.weight"] = original[:, :100].clone()  # not the merge dim
    torch.save(state, raw / "consolidated.01.pth")
    assert_fails(raw, tmp_path / "out", "consolidated.01.pth", "layers.0.attention.wq.weight", "different checkpoints")
    state["layers.0.attention.wq.weight"] = original[:100].clone()  # the merge dim: the sum is wrong
    torch.save(state, raw / "consolidated.01.pth")
    assert_fails(raw, tmp_path / "out", "consolidated.01.pth [100, 256]", "params.json implies [256, 256]")
    other = make_raw(tmp_path / "other", tokenizer_model)  # dim 64 instead of 256
    shutil.copy(other / "consolidated.01.pth", raw / "consolidated.01.pth")
    assert_fails(raw, tmp_path / "out", "consolidated.01.pth", "do not match params.json")


def test_truncated_shard(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    shard = raw / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_fails(raw, tmp_path / "out", str(shard), "truncated")


def test_pickle_holding_more_than_tensors(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    state = torch.load(raw / "consolidated.00.pth", weights_only=True)
    state["evil"] = Path("/etc/passwd")  # an object weights_only refuses to build
    torch.save(state, raw / "consolidated.00.pth")
    assert_fails(raw, tmp_path / "out", str(raw / "consolidated.00.pth"), "holds more than tensors")
    state["evil"] = "a string"  # allowed by weights_only, still not a weights file
    torch.save(state, raw / "consolidated.00.pth")
    assert_fails(raw, tmp_path / "out", "consolidated.00.pth", "holds more than tensors")


def test_cli_reports_one_line_and_exits_1(tmp_path, tiny_raw):
    raw = broken_copy(tmp_path, tiny_raw)
    (raw / "params.json").unlink()
    result = run_convert_cli(raw, tmp_path / "out")
    assert result.returncode == 1
    assert "params.json: missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_rope_freqs_buffer_is_ignored(tmp_path, tiny_raw, tiny_hf):
    """LLaMA-1's consolidated.00.pth also holds `rope.freqs` (recomputed by every implementation)."""
    raw = broken_copy(tmp_path, tiny_raw)
    state = torch.load(raw / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = torch.ones(16)
    torch.save(state, raw / "consolidated.00.pth")
    out = convert(input_dir=raw, output_dir=tmp_path / "out")
    shard = "model-00001-of-00001.safetensors"
    assert (out / shard).read_bytes() == (tiny_hf / shard).read_bytes()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"n_heads": 0}, "n_heads is 0, expected a whole number above 0"),  # was ZeroDivisionError
        ({"multiple_of": 0}, "multiple_of is 0"),  # was ZeroDivisionError
        ({"dim": "256"}, 'dim is "256"'),  # was TypeError
        ({"n_layers": 4.0}, "n_layers is 4.0"),  # was TypeError
        ({"norm_eps": None}, "norm_eps is null"),  # was converted, config.json holding rms_norm_eps null
        ({"n_heads": 256}, "not an even head size"),  # was RuntimeError in the permutation
        ({"n_kv_heads": 3}, "n_heads 8 is not a multiple of n_kv_heads 3"),
        ({"vocab_size": 999}, "params.json: vocab_size 999, but the embeddings have 1024 rows"),
        ({"dim": 512}, "dim 512, but norm.weight in consolidated.00.pth has shape [256]"),  # not "shards missing"
    ],
)
def test_params_json_values_that_cannot_be_right_are_named(tmp_path, tiny_raw, change, fragment):
    raw = broken_copy(tmp_path, tiny_raw)
    params = json.loads((raw / "params.json").read_text())
    (raw / "params.json").write_text(json.dumps(params | change))
    assert_fails(raw, tmp_path / "out", str(raw / "params.json"), fragment)


def test_n_heads_disagreeing_with_rope_freqs_is_refused(tmp_path, tiny_raw):
    """n_heads shows in no weight's shape; LLaMA-1's rope.freqs (head_dim / 2 values) gives it away."""
    raw = broken_copy(tmp_path, tiny_raw)
    state = torch.load(raw / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = torch.ones(16)  # 256 / 8 heads = 32
    torch.save(state, raw / "consolidated.00.pth")
    params = json.loads((raw / "params.json").read_text())
    (raw / "params.json").write_text(json.dumps(params | {"n_heads": 4}))  # was converted, rotary permuted wrongly
    assert_fails(raw, tmp_path / "out", "n_heads 4 gives heads of 64", "rope.freqs", "heads of 32")
