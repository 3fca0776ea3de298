"""`python -m launch.local`: the per-process command lines and environment (the 2-process run
itself is exercised by hand and in the multi-host issue; it compiles for minutes on 2 cores)."""

import pytest

from launch import local


def test_each_process_gets_its_id_the_shared_coordinator_and_its_devices():
    cmds = local.commands(3, 12345, ["--config", "configs/vla_cabin.py:tiny", "--workdir", "runs/x"])
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[1:3] == ["-m", "launch"] and "--workdir" in cmd
        assert "--coordinator_address=127.0.0.1:12345" in cmd
        assert "--num_processes=3" in cmd and f"--process_id={i}" in cmd
    env = local.process_env(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"})
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/d", "--xla_force_host_platform_device_count=4"]
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert local.free_port() > 0


def test_trainer_flags_are_required(capsys):
    with pytest.raises(SystemExit) as e:
        local.main(["--processes", "2"])
    assert e.value.code == 2 and "give the trainer's flags after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        local.main(["--processes", "0", "--", "--config", "c.py:tiny", "--workdir", "w"])
