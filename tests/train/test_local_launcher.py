"""`python -m launch.local`: the per-process command lines, environment and failure reports
(real 2-process runs, kills and a frozen peer: tests/train/test_multiprocess.py)."""

import io

import pytest

from launch import local
from vlacabin_jax import local_launch


def test_each_process_gets_its_id_the_shared_coordinator_and_its_devices():
    cmds = local_launch.commands(3, 12345, ["--config", "configs/vla_cabin.py:tiny", "--workdir", "runs/x"])
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[1:3] == ["-m", "launch"] and "--workdir" in cmd
        assert "--coordinator_address=127.0.0.1:12345" in cmd
        assert "--num_processes=3" in cmd and f"--process_id={i}" in cmd
    env = local_launch.process_env(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"})
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/d", "--xla_force_host_platform_device_count=4",
                                        "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert local_launch.free_port() > 0


def test_trainer_flags_are_required(capsys):
    with pytest.raises(SystemExit) as e:
        local.main(["--processes", "2"])
    assert e.value.code == 2 and "give the trainer's flags, e.g. --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        local.main(["--processes", "0", "--", "--config", "c.py:tiny", "--workdir", "w"])
    with pytest.raises(SystemExit):
        local.main(["--processes", "0", "--config", "c.py:tiny", "--workdir", "w"])


def test_trainer_flags_pass_through_with_or_without_the_separator(monkeypatch):
    trainer = ["--config", "configs/vla_cabin.py:tiny", "--workdir", "runs/mp", "--config.train.steps=2"]
    assert local.split_args(["--processes", "2", *trainer]) == (["--processes", "2"], trainer)
    assert local.split_args(["--processes=3", "--devices", "1", "--", *trainer]) == (
        ["--processes=3", "--devices", "1"], trainer)
    assert local.split_args([trainer[0], "--devices", "2", *trainer[1:]]) == (["--devices", "2"], trainer)
    # After `--` nothing is the launcher's, not even a flag of the same name.
    assert local.split_args(["--", "--devices", "5"]) == ([], ["--devices", "5"])
    seen = []
    monkeypatch.setattr(local, "run", lambda processes, devices, args: seen.append((processes, devices, args)) or 0)
    assert local.main(["--processes", "2", *trainer]) == 0
    assert local.main(["--processes", "2", "--", *trainer]) == 0
    assert seen == [(2, 4, trainer), (2, 4, trainer)]


def test_failure_line_names_the_process_and_the_cause():
    out = local_launch.Output(io.StringIO())
    lines = io.StringIO("step 3: loss=1\nE1201 The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
                        "The tasks have crashed.\n")
    out.pump(0, lines)
    assert out.out.getvalue().startswith("[p0] step 3: loss=1\n[p0] E1201 ") and out.unhealthy == ["1"]
    assert local_launch.failure_line(0, -6, out).startswith("error: process 1 stopped sending heartbeats")
    assert local_launch.failure_line(0, -11, out).startswith("error: process 1 stopped sending heartbeats")
    # Killed rather than frozen: process 0 is aborted by the coordination service all the same.
    assert local_launch.failure_line(1, -9, out).startswith("error: process 1 died (signal SIGKILL)")

    out = local_launch.Output(io.StringIO())
    out.pump(1, io.StringIO("error: writing a checkpoint to /x failed (disk full)\n"))
    assert local_launch.failure_line(1, 1, out) == "error: writing a checkpoint to /x failed (disk full) (process 1)"
    assert local_launch.failure_line(0, -9, local_launch.Output(io.StringIO())).startswith(
        "error: process 0 died (signal SIGKILL); the others were stopped")
    assert local_launch.describe(3) == "exit status 3"
