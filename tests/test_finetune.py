"""Fine-tuning under a real `torchrun --nproc_per_node 2` on CPU (gloo), on the tiny Vicuna.

One uninterrupted run is the reference; a second run of the same command is SIGKILLed after a
checkpoint and started again: its losses, step for step, and its final weights must equal the
reference's (same step, same data order, same optimizer state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vicunaflow import BUILTIN_CONVERSATIONS, VicunaflowError, data, finetune
from vicunaflow.finetune import config as train_config
from vicunaflow.finetune import state as train_state
from vicunaflow.finetune.data import Plan, pack

# Small and fast: 8 steps of 2 processes x 2 sequences x 2 micro-batches, a checkpoint every 2 steps.
RUN_OPTIONS = [
    "--max-steps", "8", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
    "--learning-rate", "3e-3", "--model-max-length", "160", "--save-steps", "2", "--save-total-limit", "2",
    "--logging-steps", "1", "--keep-checkpoints", "true",
]  # fmt: skip


def torchrun(model: Path, output_dir: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "vicunaflow", "finetune", "--model-path", str(model), "--data", str(BUILTIN_CONVERSATIONS),
        "--output-dir", str(output_dir), *RUN_OPTIONS, *options,
    ]  # fmt: skip


def run(command: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output_dir: Path) -> list[float]:
    entries = [json.loads(line) for line in (output_dir / train_config.TRAINER_LOG).read_text().splitlines()]
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
    return [e["loss"] for e in entries]


def weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tiny_vicuna, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(torchrun(tiny_vicuna, out))
    return out


def test_full_run_learns_rotates_checkpoints_and_writes_a_loadable_model(reference_run: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loss = losses(reference_run)
    assert len(loss) == 8
    assert sum(loss[-2:]) / 2 < 0.9 * sum(loss[:2]) / 2  # from about 7.5 to about 6
    checkpoints = reference_run.parent / ".checkpoints" / reference_run.name
    # Saved at steps 2, 4, 6 (the last step goes to the output); save_total_limit 2 keeps 4 and 6.
    assert [p.name for p in train_state.list_checkpoints(checkpoints)] == ["checkpoint-4", "checkpoint-6"]
    hyperparameters = json.loads((checkpoints / "checkpoint-6" / train_config.HYPERPARAMETERS).read_text())
    assert hyperparameters["max_steps"] == 8 and hyperparameters["save_total_limit"] == 2
    assert list((reference_run / "runs").glob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(reference_run)
    tokenizer = AutoTokenizer.from_pretrained(reference_run)
    assert tokenizer.chat_template and model.dtype == torch.float16  # the base's dtype
    assert json.loads((reference_run / "vicunaflow.json").read_text())["world_size"] == 2


def test_killed_run_resumes_with_the_same_step_data_and_optimizer_state(reference_run: Path, tiny_vicuna, tmp_path):
    import torch

    out = tmp_path / "run"
    run_dir = tmp_path / ".checkpoints" / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        torchrun(tiny_vicuna, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not train_state.list_checkpoints(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole torchrun group, mid-run, no clean-up
    process.wait(timeout=30)
    assert train_state.list_checkpoints(run_dir) and not out.exists()

    resumed = run(torchrun(tiny_vicuna, out))
    assert "resuming from" in resumed.stderr
    step = int(resumed.stderr.split("resuming from")[1].split("at step")[1].split()[0])
    assert 2 <= step < 8
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-5, abs=1e-6)
    for name, tensor in weights(reference_run).items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-3, atol=1e-3)

    # A different setting must not silently resume someone else's checkpoint (one process, no torchrun).
    command = [
        sys.executable,
        "-m",
        "vicunaflow",
        "finetune",
        "--model-path",
        str(tiny_vicuna),
        "--data",
        str(BUILTIN_CONVERSATIONS),
    ]
    command += ["--output-dir", str(tmp_path / "other"), *RUN_OPTIONS, "--seed", "1", "--nproc-per-node", "1"]
    changed = subprocess.run([*command, "--checkpoint-dir", str(run_dir)], capture_output=True, text=True, timeout=240)
    assert (
        changed.returncode == 1 and "saved by a run with other settings (seed, world_size (2 -> 1))" in changed.stderr
    )


def test_checkpoint_loads_without_unpickling_and_restores_random_draws(reference_run: Path, tmp_path) -> None:
    """Nothing in a checkpoint needs weights_only=False (a shared directory must not run code), and the
    saved random state gives the same draws again; a checkpoint missing a file names it."""
    import random
    import shutil

    import torch
    import torch.distributed as dist

    checkpoint = reference_run.parent / ".checkpoints" / reference_run.name / "checkpoint-6"
    assert not list(checkpoint.glob("*.distcp")) and not (checkpoint / ".metadata").exists()  # DCP pickles
    for file in checkpoint.glob("*.pt"):
        torch.load(file, weights_only=True)
    rng = torch.load(checkpoint / "rng-rank0.pt", weights_only=True)
    assert all(t.dtype == torch.uint8 for t in rng.values())
    scheduler_state = json.loads((checkpoint / train_state.SCHEDULER_STATE).read_text())
    assert scheduler_state["last_epoch"] == 6
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=3e-3), lambda step: 1.0)
    scheduler.load_state_dict(scheduler_state)
    assert scheduler.last_epoch == 6 and scheduler.get_last_lr() == scheduler_state["_last_lr"]

    random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached second normal (gauss_next), part of the state
    train_state._save_rng_state(tmp_path, rank=3)
    expected = [random.random(), random.gauss(0, 1)], torch.rand(8)
    random.seed(6)
    torch.manual_seed(6)
    train_state._load_rng_state(tmp_path, rank=3)
    assert [random.random(), random.gauss(0, 1)] == expected[0]
    assert torch.equal(torch.rand(8), expected[1])

    # A checkpoint without one of its files fails before loading anything, naming the file.
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / checkpoint.name)
    (run_dir / checkpoint.name / "rng-rank1.json").unlink()
    config = train_config.TrainConfig(**json.loads((checkpoint / train_config.HYPERPARAMETERS).read_text()))
    runtime = train_config.Runtime(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), dtype=torch.float32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(VicunaflowError, match=r"rng-rank1\.json: missing .* delete .* to start over"):
            train_state.resume_if_possible(run_dir, config, None, None, None, runtime)
        # Damaged files (all there, unreadable): an error naming the file and the checkpoint to delete, no traceback.
        shutil.copy(checkpoint / "rng-rank0.json", run_dir / checkpoint.name / "rng-rank1.json")
        state_file = run_dir / checkpoint.name / "state-rank0.pt"
        state_file.write_bytes(state_file.read_bytes()[:1000])
        with pytest.raises(
            VicunaflowError, match=r"state-rank0\.pt: cannot be read .* damaged: delete .*checkpoint-6 to"
        ):
            train_state.resume_if_possible(run_dir, config, None, None, None, runtime)
        (run_dir / checkpoint.name / train_state.TRAINER_STATE).write_text('{"step": 6, "world_')
        with pytest.raises(VicunaflowError, match=r"trainer_state\.json: cannot be read \(JSONDecodeError"):
            train_state.resume_if_possible(run_dir, config, None, None, None, runtime)
    finally:
        dist.destroy_process_group()


def test_gradient_sync_once_per_step_matches_sync_per_micro_batch(reference_run: Path, tiny_vicuna, tmp_path) -> None:
    """Accumulating full gradients locally and reduce-scattering once per step (weights kept gathered
    between micro-batches) is the same sum as reducing every micro-batch: same losses, same weights."""
    import torch

    out = tmp_path / "step-sync"
    result = run(torchrun(tiny_vicuna, out, "--gradient-sync", "step"))
    assert '"gradient_sync": "step"' in result.stderr
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-4, abs=1e-5)  # reference: auto = every (CPU)
    for name, tensor in weights(reference_run).items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-3, atol=1e-3)


def test_sharded_load_and_gather_are_exact(tiny_vicuna, tmp_path: Path) -> None:
    """Rank 0 reads the weights, rank 1 gets its shards by broadcast; at learning rate 0 the gathered
    output must be the base model bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero"
    run(torchrun(tiny_vicuna, out, "--learning-rate", "0", "--max-steps", "1", "--save-dtype", "float32"))
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32).state_dict()
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[name], base[name]) for name in base)


def test_lora_run_writes_adapter_and_merged_model(tiny_vicuna, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    tokenized = data.tokenize(
        data=BUILTIN_CONVERSATIONS, model_path=tiny_vicuna, output_dir=tmp_path / "tok", model_max_length=256
    )
    # Started without torchrun: `--nproc-per-node 2` makes the command launch its own processes.
    command = [sys.executable, "-m", "vicunaflow", "finetune", "--model-path", str(tiny_vicuna)]
    command += ["--data", str(tokenized), "--output-dir", str(out), "--nproc-per-node", "2", "--method", "lora"]
    command += ["--max-steps", "2", "--learning-rate", "1e-2", "--model-max-length", "256", "--packing", "true"]
    result = run(command)
    assert "packed 156 conversations into" in result.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out.parent / ".checkpoints").exists()  # removed once the output is written
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32)
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert merged_state.keys() == base_state.keys()
    changed = [name for name in base_state if not torch.equal(merged_state[name], base_state[name])]
    assert changed and all(any(t in name for t in train_config.LORA_TARGETS) for name in changed)


def test_qlora_without_cuda_fails_clearly(tiny_vicuna, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command = [sys.executable, "-m", "vicunaflow", "finetune", "--model-path", str(tiny_vicuna), "--method", "qlora"]
    command += ["--data", str(BUILTIN_CONVERSATIONS), "--output-dir", str(tmp_path / "q"), "--nproc-per-node", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "--method qlora needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


# --- options and data that must fail before anything loads -----------------------------------------


def finetune_cli(model: Path, data_path: Path, output_dir: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vicunaflow", "finetune", "--model-path", str(model), "--data", str(data_path)]
    command += ["--output-dir", str(output_dir), "--nproc-per-node", "1", "--max-steps", "1", *options]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--learning-rate=-1e-4"], "--learning-rate must be at least 0, not -0.0001"),
        (["--method", "lora", "--lora-r", "0"], "--lora-r must be at least 1, not 0"),
        (["--weight-decay", "-0.1"], "--weight-decay must be at least 0, not -0.1"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be at least 0, not -1.0"),
    ],
    ids=["learning-rate", "lora-r", "weight-decay", "max-grad-norm"],
)
def test_bad_options_fail_before_the_model_or_data_load(tiny_vicuna, tmp_path: Path, options, message) -> None:
    result = finetune_cli(tiny_vicuna, BUILTIN_CONVERSATIONS, tmp_path / "out", *options)
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".checkpoints").exists()  # fit() makes it first, before data and model load


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, low - 1 if inclusive else low) for name, (low, inclusive) in train_config.BOUNDS.items()]
    + [("warmup_ratio", 1.0), ("lora_dropout", 1.0), ("max_steps", 0), ("learning_rate", float("nan"))]
    + [("seed", 2**64)],  # "ValueError: Overflow when unpacking long long" in every process
)
def test_every_numeric_option_is_checked_before_anything_runs(tmp_path: Path, name: str, value) -> None:
    """No model or data needed: the options are checked first (these paths do not even exist)."""
    with pytest.raises(VicunaflowError, match=f"--{name.replace('_', '-')} must be"):
        config = train_config.TrainConfig(
            model_path=tmp_path / "m", data=tmp_path / "d", output_dir=tmp_path / "o", **{name: value}
        )
        finetune.setup(config=config)


def test_config_schema_bounds_are_those_of_validate() -> None:
    """`snakemake -n` refuses what `vicunaflow finetune` would: the schema's bounds are config.BOUNDS."""
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    options = schema["definitions"]["finetune_options"]["properties"]
    lows = {name: {k: v for k, v in o.items() if k in ("minimum", "exclusiveMinimum")} for name, o in options.items()}
    assert lows == {
        name: {"minimum" if inclusive else "exclusiveMinimum": low}
        for name, (low, inclusive) in train_config.BOUNDS.items()
    }


def test_config_schema_defaults_are_those_of_train_config() -> None:
    """The workflow's `finetune.defaults` are the command's: every option of TrainConfig but the three
    paths the rule gives, with TrainConfig's default (the one definition; the schema repeats it)."""
    import dataclasses

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    defaults = schema["properties"]["finetune"]["properties"]["defaults"]["properties"]
    expected = {
        field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        for field in dataclasses.fields(train_config.TrainConfig)
        if field.name not in ("model_path", "data", "output_dir")
    }
    assert {name: option["default"] for name, option in defaults.items()} == expected
    assert all(type(option["default"]) is type(expected[name]) for name, option in defaults.items())


def test_flags_and_a_config_file_give_the_same_options(tmp_path: Path) -> None:
    """The flags users type (dashed, FastChat's bare bools, JSON values) parse to the options they always
    did, and `--config FILE` of TrainConfig's keys (what the workflow passes) to the same; later flags win."""
    flags = ["--model-path", "m", "--data", "d", "--output-dir", "o", "--learning-rate", "1e-4", "--bf16", "false"]
    flags += ["--gradient-checkpointing", "--lora-target-modules", '["q_proj", "v_proj"]', "--save-total-limit=null"]
    flags += ["--num-train-epochs", "3", "--method", "lora", "--nproc-per-node", "2"]

    def parsed(*args: str) -> dict:
        import yaml

        command = [sys.executable, "-m", "vicunaflow", "finetune", *args, "--print_config"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)

    expected = {
        **{f.name: f.default for f in dataclasses.fields(train_config.TrainConfig) if f.default is not dataclasses.MISSING},
        "model_path": "m", "data": "d", "output_dir": "o", "learning_rate": 1e-4, "bf16": False,
        "gradient_checkpointing": True, "lora_target_modules": ["q_proj", "v_proj"], "save_total_limit": None,
        "num_train_epochs": 3.0, "method": "lora", "nproc_per_node": 2,
    }  # fmt: skip
    from_flags = parsed(*flags)
    assert from_flags == expected
    options = {k: v for k, v in from_flags.items() if k != "nproc_per_node"}
    (tmp_path / "options.json").write_text(json.dumps({**options, "learning_rate": 5.0}))
    assert (
        parsed("--config", str(tmp_path / "options.json"), "--learning-rate", "1e-4", "--nproc-per-node", "2")
        == expected
    )


def test_an_empty_tokenised_dataset_is_refused(tiny_vicuna, tmp_path: Path) -> None:
    """What `data tokenize --model-max-length 0` used to write: 0 samples (finetune then divided by zero)."""
    import torch
    from safetensors.torch import save_file

    empty = tmp_path / "empty"
    empty.mkdir()
    tensors = {"input_ids": torch.zeros(0, dtype=torch.int32), "labels": torch.zeros(0, dtype=torch.int32)}
    save_file({**tensors, "offsets": torch.zeros(1, dtype=torch.int64)}, str(empty / data.TOKENS_FILE))
    meta = {"format": "vicunaflow-tokenized-v1", "model_max_length": 0, "n_samples": 0, "n_tokens": 0, "ids": []}
    (empty / data.META_FILE).write_text(json.dumps({**meta, "n_trained_tokens": 0, "tokenizer_sha256": {}}))
    result = finetune_cli(tiny_vicuna, empty, tmp_path / "out")
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{empty}: an empty tokenised dataset (0 samples)" in result.stderr
    assert "Traceback" not in result.stderr and "ZeroDivisionError" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_whose_weights_lack_layers_its_config_lists_is_refused_before_training(tiny_vicuna, tmp_path: Path):
    """transformers would start the layers the weights lack at random and train them as if they were the model's."""
    model = tmp_path / "model"
    shutil.copytree(tiny_vicuna, model)
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": layers + 2}))
    result = finetune_cli(model, BUILTIN_CONVERSATIONS, tmp_path / "out")
    assert result.returncode == 1, result.stderr[-3000:]
    first = f"model.layers.{layers}.input_layernorm.weight, model.layers.{layers}.mlp.down_proj.weight"
    assert f"{model}: no tensor {first}" in result.stderr, result.stderr[-3000:]
    assert "and 15 more (18 of the " in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".checkpoints").exists(), "refused before the run"


def test_a_truncated_weights_file_is_named_before_training(tiny_vicuna, tmp_path: Path) -> None:
    """A shard cut short (a copy or download stopped halfway) is named, with what to do, not a safetensors traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_vicuna, model)
    (shard,) = model.glob("*.safetensors")
    os.truncate(shard, shard.stat().st_size // 2)
    result = finetune_cli(model, BUILTIN_CONVERSATIONS, tmp_path / "out")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{shard}: not a complete safetensors file, truncated or corrupt" in result.stderr, result.stderr[-3000:]
    assert "re-run the step that wrote it" in result.stderr
    assert "Traceback" not in result.stderr and "SafetensorError" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".checkpoints").exists(), "refused before the run"


def test_plan_is_a_seeded_partition_of_each_epoch() -> None:
    config = SimpleNamespace(
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=-1, num_train_epochs=2.0, seed=3
    )
    plan = Plan.make(n_sequences=11, config=config, world_size=2)
    assert (plan.steps_per_epoch, plan.total_steps) == (2, 4)
    epoch0 = [i for step in range(2) for rank in range(2) for batch in plan.micro_batches(step, rank) for i in batch]
    assert sorted(set(epoch0)) == list(range(11)) and len(epoch0) == 12  # one index repeats to even out ranks
    assert plan.micro_batches(2, 0) != plan.micro_batches(0, 0)  # a new order each epoch
    assert plan.micro_batches(2, 0) == Plan.make(11, config, 2).micro_batches(2, 0)


def test_packing_keeps_sequences_within_length() -> None:
    from vicunaflow.data import Sample

    samples = [Sample(str(i), [1] * n, [1] * n) for i, n in enumerate([100, 60, 50, 30, 120])]
    packed = pack(samples, max_length=160)
    assert sorted(i for sequence in packed for i in sequence) == list(range(5))
    assert all(sum(len(samples[i].input_ids) for i in sequence) <= 160 for sequence in packed)
    assert packed == [[0, 1], [2, 3], [4]]


def test_launch_commands_for_one_node_and_slurm_nodes(monkeypatch) -> None:
    from vicunaflow import launch

    monkeypatch.setattr(launch.shutil, "which", lambda name: None)  # no scontrol: parse the node list
    assert launch.launch_command(["finetune"], 1, env={}) is None
    single = launch.launch_command(["finetune", "--x=1"], 4, env={})
    assert single[1:5] == ["-m", "vicunaflow.launch", "--standalone", "--nproc_per_node=4"]
    assert single[-4:] == ["-m", "vicunaflow", "finetune", "--x=1"]
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_JOB_ID": "1234", "SLURM_NODEID": "1"}
    batch_step = launch.launch_command(["finetune"], 8, env=slurm)
    assert batch_step[:3] == ["srun", "--nodes=2", "--ntasks=2"]
    assert batch_step[: len(launch.srun_per_node(2))] == launch.srun_per_node(2)  # the workflow's srun too
    assert "--cpus-per-task=16" in launch.launch_command(["finetune"], 8, env=slurm | {"SLURM_CPUS_PER_TASK": "16"})
    assert launch.srun_per_node(4, cpus_per_task=64) == [
        "srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1",
        f"--export=ALL,{launch.NODE_TASK_ENV}=1",
    ]  # fmt: skip
    node_task = launch.launch_command(["finetune"], 8, env=slurm | {launch.NODE_TASK_ENV: "1"})
    assert "--nnodes=2" in node_task and "--node_rank=1" in node_task and "--nproc_per_node=8" in node_task
    assert "--rdzv_endpoint=gpu07:29634" in node_task and "--rdzv_id=1234" in node_task


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MASTER_PORT": "29x00"}, "MASTER_PORT"),
        ({"MASTER_PORT": ""}, "MASTER_PORT"),
        ({"SLURM_JOB_ID": "job7"}, "SLURM_JOB_ID"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ],
    ids=["port", "empty-port", "job-id", "no-nodelist"],
)
def test_launch_command_names_a_bad_slurm_variable(monkeypatch, env, variable) -> None:
    from vicunaflow import launch

    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    node_task = {
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "1234",
        launch.NODE_TASK_ENV: "1",
    }
    node_task = {k: v for k, v in (node_task | env).items() if v is not None}
    with pytest.raises(VicunaflowError, match=variable):
        launch.launch_command(["finetune"], 8, env=node_task)


# --- the checkpoint folder: never one whose removal destroys something ------------------------------


@pytest.mark.parametrize(
    ("checkpoint_dir", "message"),
    [
        ("data", "it contains the --data"),
        ("data/train.json", "it is the --data"),
        ("models/llama", "it is the --model-path"),
        ("models/llama/checkpoints", "it lies inside the --model-path"),
        ("models", "it contains the --model-path"),
        ("out/checkpoints", "it lies inside the --output-dir"),
        (".", "it contains the --model-path"),
        ("work", "it is the working directory"),
    ],
)
def test_a_checkpoint_dir_holding_or_inside_what_the_run_needs_is_refused(
    tmp_path: Path, monkeypatch, checkpoint_dir: str, message: str
) -> None:
    """checkpoint_dir is removed after training: refused (by validate, before anything loads) when it is,
    holds or lies in the model, the data or the output, or is the working directory."""
    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "models" / "llama" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    config = train_config.TrainConfig(
        model_path=tmp_path / "models" / "llama", data=tmp_path / "data" / "train.json", output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / checkpoint_dir,
    )  # fmt: skip
    with pytest.raises(VicunaflowError, match=f"--checkpoint-dir .*{message}"):
        config.validate()


def test_lora_target_modules_a_llama_does_not_have_are_refused_before_loading(tmp_path: Path) -> None:
    config = train_config.TrainConfig(
        model_path=tmp_path, data=tmp_path, output_dir=tmp_path / "out", lora_target_modules=["q_proj", "foo_proj"]
    )
    with pytest.raises(VicunaflowError, match=r"--lora-target-modules \['foo_proj'\]: a LLaMA's linear layers"):
        config.validate()


def test_a_run_failing_before_its_first_checkpoint_leaves_no_checkpoint_folder(tiny_vicuna, tmp_path: Path) -> None:
    """A folder holding only the run's marker is no run to resume: a failed run removes it (and `.checkpoints/`
    if that is then empty); one holding a checkpoint is kept, since a rerun resumes from it, and so is one whose
    trainer log records steps (how the run went before it failed)."""
    cut_short = tmp_path / "cut.json"
    cut_short.write_text('[{"id": "a", "conversations": ')  # the data fail to load, after the checkpoint folder is made
    result = finetune_cli(tiny_vicuna, cut_short, tmp_path / "out")
    assert result.returncode != 0 and f"{cut_short}: not valid JSON" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / ".checkpoints").exists()
    resumable = tmp_path / ".checkpoints" / "out"
    (resumable / "checkpoint-2").mkdir(parents=True)
    (resumable / ".vicunaflow-checkpoints").write_text("")
    result = finetune_cli(tiny_vicuna, cut_short, tmp_path / "out")
    assert result.returncode != 0 and f"{cut_short}: not valid JSON" in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in resumable.iterdir()) == [".vicunaflow-checkpoints", "checkpoint-2"]
    (resumable / "checkpoint-2").rmdir()
    (resumable / "trainer_log.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    result = finetune_cli(tiny_vicuna, cut_short, tmp_path / "out")
    assert result.returncode != 0 and "records the steps before the failure" in result.stderr, result.stderr[-3000:]
    assert (resumable / "trainer_log.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'


def test_a_checkpoint_dir_with_foreign_files_is_kept_after_training(tiny_vicuna, tmp_path: Path) -> None:
    """Only a checkpoint folder the run made (its marker file) is removed at the end; one that held files stays."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = finetune_cli(tiny_vicuna, BUILTIN_CONVERSATIONS, tmp_path / "out", "--checkpoint-dir", str(foreign))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not (foreign / ".vicunaflow-checkpoints").exists()
    made = tmp_path / "made"
    result = finetune_cli(tiny_vicuna, BUILTIN_CONVERSATIONS, tmp_path / "out2", "--checkpoint-dir", str(made))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not made.exists()  # this run made it: removed once the output is written


@pytest.mark.parametrize("source", ["lazy", "tokenised"])
def test_a_max_length_with_no_room_for_a_reply_is_refused(tiny_vicuna, tmp_path: Path, source: str) -> None:
    """64 tokens hold the system prompt and a question but no reply: every step trained on nothing (loss 0) and the
    input model was written back as the output. Eager tokenisation refused it already; lazy and tokenised data did not."""
    from vicunaflow.finetune.data import TrainingData

    path = BUILTIN_CONVERSATIONS
    if source == "tokenised":
        path = data.tokenize(model_path=tiny_vicuna, data=BUILTIN_CONVERSATIONS, output_dir=tmp_path / "tok")
    config = train_config.TrainConfig(
        model_path=tiny_vicuna, data=path, output_dir=tmp_path / "out", model_max_length=64
    )
    runtime = train_config.Runtime(rank=0, local_rank=0, world_size=1, device="cpu", dtype=None)
    with pytest.raises(VicunaflowError, match=r"--model-max-length 64: no conversation has a reply token within it"):
        TrainingData(config, runtime)
    assert len(TrainingData(dataclasses.replace(config, model_max_length=160), runtime)) == 156


def test_a_failed_worker_ends_the_launch_with_its_status_not_a_torchrun_traceback(tmp_path: Path) -> None:
    """A worker that logged its one-line error and exited 1 was followed by torchrun's ChildFailedError traceback
    and a box of PIDs (every finetune error with --nproc-per-node 2: bad data, a mismatched checkpoint)."""
    from vicunaflow import launch

    verb = ["finetune", "--model-path", str(tmp_path / "none"), "--data", "d", "--output-dir", str(tmp_path / "o")]
    result = subprocess.run(launch.launch_command(verb, 2, env={}), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "none: not a Hugging Face model directory" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]


def test_a_checkpoint_of_other_data_is_not_resumed(tmp_path: Path) -> None:
    """The step of a checkpoint says where it was in its data; another --data went on from there silently."""
    import torch
    import torch.distributed as dist

    saved = train_config.TrainConfig(model_path="m", data="a.json", output_dir=tmp_path / "out")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / train_config.HYPERPARAMETERS).write_text(json.dumps(saved.as_dict()))
    (checkpoint / train_state.TRAINER_STATE).write_text(json.dumps({"step": 2, "world_size": 1}))
    runtime = train_config.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(VicunaflowError, match=r"checkpoint-2: saved by a run with other settings \(data\)"):
            config = dataclasses.replace(saved, data="b.json")
            train_state.resume_if_possible(tmp_path / "run", config, None, None, None, runtime)
    finally:
        dist.destroy_process_group()


def test_a_lora_rank_above_the_layers_dimensions_is_refused(tiny_vicuna, tmp_path: Path) -> None:
    """--lora-r 100000 on the tiny model (hidden size 256) made adapters of 2 billion parameters: killed for memory."""
    config = train_config.TrainConfig(
        model_path=tiny_vicuna, data=BUILTIN_CONVERSATIONS, output_dir=tmp_path / "out", method="lora", lora_r=257
    )
    with pytest.raises(
        VicunaflowError, match=r"--lora-r 257: above 256, the smaller dimension of q_proj in .* at most"
    ):
        config.validate()
    dataclasses.replace(config, lora_r=256).validate()
    dataclasses.replace(config, method="full").validate()  # not used by a full fine-tune


@pytest.mark.parametrize("file", ["ckpt", ".checkpoints"])
def test_a_checkpoint_dir_that_is_or_lies_in_a_file_is_refused_before_anything_runs(tmp_path: Path, file: str) -> None:
    """The run's mkdir said only "[Errno 17] File exists: 'ckpt'" (or "Not a directory"), after torch had started."""
    (tmp_path / file).write_text("the user's\n")
    given = tmp_path / "ckpt" if file == "ckpt" else None
    config = train_config.TrainConfig(model_path="m", data="d", output_dir=tmp_path / "out", checkpoint_dir=given)
    with pytest.raises(VicunaflowError, match=rf"--checkpoint-dir .*: .*{file} is a file, not a folder; move it away"):
        config.check_checkpoint_dir()
    assert (tmp_path / file).read_text() == "the user's\n"
    # A file above the output too: left to the output's check, which names the --output-dir's folder.
    dataclasses.replace(config, output_dir=tmp_path / file / "out", checkpoint_dir=None).check_checkpoint_dir()


def test_a_failed_run_with_checkpoints_says_it_resumes_from_the_newest(tmp_path: Path, caplog) -> None:
    """It said "no checkpoint to resume from" when its trainer log had steps, whatever checkpoints it held."""
    from vicunaflow.finetune import loop

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-10").mkdir(parents=True)
    (run_dir / "checkpoint-10" / train_state.TRAINER_STATE).write_text('{"step": 10, "world_size": 1}')
    (run_dir / loop.CHECKPOINT_MARKER).write_text("")
    (run_dir / train_config.TRAINER_LOG).write_text('{"step": 1}\n')
    with caplog.at_level("INFO"):
        loop.remove_if_nothing_to_resume(run_dir)
    assert "running the same command again resumes from checkpoint-10" in caplog.text
    assert "no checkpoint" not in caplog.text and (run_dir / "checkpoint-10").is_dir()


def test_options_the_run_will_not_use_are_said(tiny_vicuna, tmp_path: Path) -> None:
    """--lora-r 16 without --method lora ran a full fine-tune without a word (LLaMA-Factory's default is LoRA), and a
    --model-max-length past the model's positions trained there silently."""
    config = train_config.TrainConfig(model_path=tiny_vicuna, data=BUILTIN_CONVERSATIONS, output_dir=tmp_path / "o")
    assert config.warnings() == []
    assert dataclasses.replace(config, method="lora", lora_r=16).warnings() == []
    (note,) = dataclasses.replace(config, lora_r=16, lora_target_modules=["q_proj"]).warnings()
    assert note.startswith("--lora-r, --lora-target-modules ignored: --method full trains every weight; give --method")
    (note,) = dataclasses.replace(config, model_max_length=4096).warnings()
    assert note.startswith(f"--model-max-length 4096 is beyond the 2048 positions of {tiny_vicuna}")


def test_fsdp_offload_without_cuda_fails_clearly(tmp_path: Path) -> None:
    """FSDP's CPU offload pins memory for a GPU: on a CPU-only machine the run ended in a RuntimeError traceback
    ("Cannot access accelerator device when none is available")."""
    import torch

    from vicunaflow.finetune import loop

    config = train_config.TrainConfig(
        model_path="m", data="d", output_dir=tmp_path / "o", fsdp="full_shard auto_wrap offload"
    )
    with pytest.raises(VicunaflowError, match=r"--fsdp 'full_shard auto_wrap offload': offload keeps a GPU's shards"):
        loop._resolve_precision(config, torch.device("cpu"))


def test_a_runs_options_reused_with_another_output_checkpoint_beside_that_output(tmp_path: Path) -> None:
    """training_args.json named its run's checkpoint folder: `--config old/training_args.json --output-dir new`
    resumed from the old run's checkpoints (and, when done, removed them)."""
    old = train_config.TrainConfig(model_path="m", data="d", output_dir=tmp_path / "old")
    saved = json.loads(json.dumps(old.as_dict()))  # as training_args.json holds it
    new = train_config.TrainConfig(**(saved | {"output_dir": str(tmp_path / "new")}))
    assert new.checkpoint_dir == str(tmp_path / ".checkpoints" / "new")
    given = dataclasses.replace(old, checkpoint_dir=str(tmp_path / "mine"))  # one given is kept
    assert given.as_dict()["checkpoint_dir"] == str(tmp_path / "mine")


def test_a_trainer_log_line_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path: Path) -> None:
    """A run killed (or out of disk) while appending to trainer_log.jsonl left a torn last line, and every resume
    then stopped with a JSONDecodeError traceback before its first step."""
    from vicunaflow.finetune.output import RunLogger

    log_file = tmp_path / train_config.TRAINER_LOG
    log_file.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    config = train_config.TrainConfig(model_path="m", data="d", output_dir=tmp_path / "out", report_to="none")
    runtime = train_config.Runtime(rank=0, local_rank=0, world_size=1, device="cpu", dtype=None)
    RunLogger(tmp_path, config, runtime, start_step=2).close()
    assert log_file.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n'


@pytest.mark.parametrize("state", [{"step": "x", "world_size": 1}, {"step": 2, "world_size": "1"}])
def test_a_checkpoint_whose_trainer_state_is_damaged_is_named(tmp_path: Path, state: dict) -> None:
    """A step that is no number stopped the resume with int()'s traceback once the model had loaded, and a world
    size written as text was refused as "world_size (1 -> 1)": settings that changed, from 1 to 1."""
    import torch
    import torch.distributed as dist

    config = train_config.TrainConfig(model_path="m", data="a.json", output_dir=tmp_path / "out")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / train_config.HYPERPARAMETERS).write_text(json.dumps(config.as_dict()))
    (checkpoint / train_state.TRAINER_STATE).write_text(json.dumps(state))
    runtime = train_config.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(
            VicunaflowError, match=r"trainer_state.json: cannot be read .*checkpoint is damaged: delete"
        ):
            train_state.resume_if_possible(tmp_path / "run", config, None, None, None, runtime)
    finally:
        dist.destroy_process_group()
