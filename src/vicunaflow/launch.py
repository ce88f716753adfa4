"""Start `vicunaflow finetune` on every GPU and node of a job, so one command scales from 1 GPU to many nodes.

Under `torchrun` (RANK in the environment) nothing happens here: the processes already exist.
Otherwise `vicunaflow finetune --nproc-per-node N` re-executes itself through `torch.distributed.run`
(`python -m vicunaflow.launch`, which ends with a failed worker's status instead of torchrun's traceback):

- one node (no SLURM, or a one-node allocation): `torchrun --standalone --nproc_per_node N`;
- a SLURM allocation of several nodes (the batch step: SLURM_NNODES > 1): `srun` starts one task per
  node, each of which runs torchrun with `--nnodes SLURM_NNODES --node_rank SLURM_NODEID` and a c10d
  rendezvous on the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`), id SLURM_JOB_ID.

So a Snakemake rule needs only `vicunaflow finetune ...`; the profile decides nodes and GPUs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

from vicunaflow import VicunaflowError

log = logging.getLogger(__name__)

# Set on the per-node tasks that the batch step starts with srun, so they run torchrun, not srun again.
NODE_TASK_ENV = "VICUNAFLOW_NODE_TASK"
DEFAULT_PORT = 29400


def is_launched() -> bool:
    """True inside a torchrun worker (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_nproc_per_node() -> int:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES, as SLURM sets it), else 1 process on CPU."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launch_command(verb_argv: list[str], nproc_per_node: int, env: dict[str, str] | None = None) -> list[str] | None:
    """The command that starts `vicunaflow <verb_argv>` on all processes, or None to run in this process.

    `verb_argv` is the verb and its arguments (`["finetune", "--model_path", ...]`).
    """
    env = dict(os.environ if env is None else env)
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) or 1)
    module = [sys.executable, "-m", "vicunaflow", *verb_argv]
    launcher = [sys.executable, "-m", "vicunaflow.launch"]  # torch.distributed.run without its traceback: torchrun()
    if nnodes > 1 and NODE_TASK_ENV not in env:
        # The batch step of a multi-node job: one task per node, each starts its local processes.
        cpus = env.get("SLURM_CPUS_PER_TASK")  # srun reads it anyway; said explicitly, as the workflow does
        return [*srun_per_node(nnodes, cpus_per_task=int(cpus) if cpus else None), *module]
    if nnodes > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise VicunaflowError(
                f"a {nnodes}-node task needs SLURM_JOB_NODELIST (or SLURM_NODELIST) to find the rendezvous host; "
                "run it inside the SLURM allocation (sbatch/salloc), or set SLURM_JOB_NODELIST"
            )
        host = first_host(nodelist)
        if "MASTER_PORT" in env:
            port = _integer(env, "MASTER_PORT", "a TCP port for the rendezvous, e.g. 29400")
        else:
            port = DEFAULT_PORT + _integer(env, "SLURM_JOB_ID", "SLURM's numeric job id", default="0") % 1000
        return [
            *launcher,
            f"--nnodes={nnodes}", f"--node_rank={env.get('SLURM_NODEID', '0')}", f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={host}:{port}", f"--rdzv_id={env.get('SLURM_JOB_ID', 'vicunaflow')}",
            "--max_restarts=0", *module[1:],
        ]  # fmt: skip
    if nproc_per_node > 1:
        return [
            *launcher,
            "--standalone",
            f"--nproc_per_node={nproc_per_node}",
            *module[1:],
        ]
    return None


def _integer(env: dict[str, str], name: str, expected: str, default: str | None = None) -> int:
    """The environment variable `name` as an int, or a VicunaflowError naming it."""
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise VicunaflowError(f"{name}={value!r} is not an integer; give {expected}, or unset it") from None


def srun_per_node(nodes: int, *, cpus_per_task: int | None = None) -> list[str]:
    """`srun` that runs the command after it once on each node of the allocation, marked as a node task.

    Used by the batch step of a multi-node job (launch_command) and by the workflow's finetune rule,
    whose job step hides the allocation from `vicunaflow finetune` (workflow/rules/common.smk). Each
    task then sees its step's SLURM_NNODES, SLURM_NODEID and node list, and NODE_TASK_ENV tells it to
    start torchrun rather than srun again. A failed task ends the others (--kill-on-bad-exit).
    """
    cpus = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1",
        f"--export=ALL,{NODE_TASK_ENV}=1",
    ]  # fmt: skip


def relaunch(verb_argv: list[str], nproc_per_node: int) -> bool:
    """Run the verb on all processes of the job; False when this process should just go on alone."""
    command = launch_command(verb_argv, nproc_per_node)
    if command is None:
        return False
    log.info("launching: %s", " ".join(command))
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        # The workers have logged the reason; exit with their status, without a second message.
        sys.exit(result.returncode)
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[01-04],cpu7` -> `gpu01`)."""
    if shutil.which("scontrol"):
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    # No scontrol on this host: expand the first entry ourselves.
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.fullmatch(r"(.*)\[([^\]]+)\](.*)", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def torchrun(argv: list[str]) -> None:
    """`python -m torch.distributed.run ARGV`, ending as the failed worker ended rather than in a traceback.

    torchrun reports a worker that exited 1 (after logging its one-line error, say a data file that is not
    JSON) with a ChildFailedError traceback and a box of PIDs below it, burying that line; it reports a
    Ctrl-C or SIGTERM with a SignalException traceback. Here both end with the status alone: 1, or 128 + signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        sys.exit(128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode or 1)
    except SignalException as err:
        sys.exit(128 + int(err.sigval))


if __name__ == "__main__":
    torchrun(sys.argv[1:])
