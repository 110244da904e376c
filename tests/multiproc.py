"""Start real multi-process runs for the tests: `accelerate launch --multi_gpu --num_processes N` (on a CPU-only
machine accelerate then runs N processes over gloo; `--cpu --num_processes N` would start only one), one torch
thread per process (more threads than cores slowed a build 17x on this 2-core machine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(processes: int) -> list[str]:
    """The launcher prefix: `python` for 1 process, accelerate's multi-process launcher for more."""
    if processes == 1:
        return [sys.executable]
    return [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
    ]


def environment(env: dict | None = None) -> dict:
    """The processes' environment: one thread each, this checkout first on the path, then `env`."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }


def run_processes(
    processes: int,
    args: list[str],
    timeout: float = 240,
    cwd: Path = REPO,
    env: dict | None = None,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python ARGS` in `processes` processes (a script path and its arguments, or `-m module ...`);
    `launcher`: other `accelerate launch` options in place of the multi-process defaults (a config file)."""
    command = ([ACCELERATE, "launch", *launcher] if launcher else launch_command(processes)) + list(args)
    return subprocess.run(command, cwd=cwd, env=environment(env), capture_output=True, text=True, timeout=timeout)


def start_processes(processes: int, args: list[str], cwd: Path = REPO) -> subprocess.Popen:
    """`run_processes` without waiting, its output dropped: a run to kill (`kill_processes`)."""
    command = launch_command(processes) + list(args)
    return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_processes(process: subprocess.Popen) -> None:
    """SIGKILL a run that `start_processes` started, as a power cut would end it: its workers (children of the
    launcher, each in a session of its own, so they are signalled by their ids), then the launcher itself."""
    import signal

    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()


def kill_at_checkpoint(processes: int, args: list[str], checkpoints: Path, at_least: int = 1) -> None:
    """Start `python ARGS` on `processes` processes (`start_processes`), wait until checkpoint `at_least` (or a
    later one) is in `checkpoints`, and SIGKILL the run (`kill_processes`); fails if the run ended first."""
    import time

    from shared.checkpoint import latest_checkpoint

    process = start_processes(processes, args)
    target, deadline = f"step-{at_least:06d}", time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        checkpoint = latest_checkpoint(checkpoints)
        if checkpoint is not None and checkpoint.name >= target:
            break
        time.sleep(0.01)
    ended = process.poll()
    kill_processes(process)
    assert ended is None, "the run ended before it could be killed"


def force_fsdp_on_cpu(accelerator) -> None:
    """Put `accelerator` on accelerate's FSDP path on a CPU-only machine, where accelerate 1.15 never chooses FSDP
    by itself (its processes run as MULTI_CPU DDP). The plugin is the one accelerate builds from the FSDP_*
    variables that `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets; the state is changed in
    PartialState too, which AcceleratorState copies again whenever it is instantiated (prepare does)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with --config_file configs/accelerate/fsdp.yaml"
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # FSDP1 wants its device_id to equal the compute device "cpu"
