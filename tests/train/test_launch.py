"""`python -m launch`: bad input fails with one `error:` line and exit code 2, before any training,
without touching existing checkpoints; multi-process detection."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _start(args, workdir):
    cmd = [sys.executable, "-m", "launch", "--workdir", str(workdir), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    tiny = ["--config", "configs/vla_cabin.py:tiny"]
    cases = {
        "unknown field": (tiny + ["--config.optim.lrr=1e-3"], tmp_path / "w1", "lrr"),
        "wrong type": (tiny + ["--config.train.steps=many"], tmp_path / "w2", "steps"),
        "impossible value": (tiny + ["--config.optim.lr=-1"], tmp_path / "w3", "optim.lr"),
        "align without its sft run": (["--config", "configs/stages/align.py:tiny"], tmp_path / "w4",
                                      "needs train.init_from"),
        "missing config file": (["--config", "configs/nope.py:tiny"], tmp_path / "w5", "nope.py"),
        "workdir is a file": (tiny, a_file, "not a directory"),
        "mesh does not fit": (tiny + ["--config.mesh.data=3"], tmp_path / "w7", "devices"),
        "anchor file missing": (tiny + ["--config.model.anchor_weights=w8/anchor.safetensors"], tmp_path / "w8",
                                "model.anchor_weights"),
    }
    procs = {name: _start(args, workdir) for name, (args, workdir, _) in cases.items()}  # in parallel
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, f"{name}: rc {proc.returncode}\n{err[-2000:]}"
        assert "Traceback" not in err, f"{name}:\n{err[-2000:]}"
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and cases[name][2] in errors[0], f"{name}: {lines}"
    assert not (tmp_path / "w1").exists()  # flag errors stop before anything is created


def test_bad_mesh_leaves_existing_checkpoints_untouched(tmp_path):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from configs.vla_cabin import get_config
    from vlacabin_jax import sharding
    from vlacabin_jax.train import checkpoint as ckpt_lib

    mesh = sharding.make_mesh(get_config("tiny").mesh)
    state = jax.device_put({"w": np.ones((8, 4), np.float32)}, NamedSharding(mesh, PartitionSpec("data")))
    ck = ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints", get_config("tiny"), mesh_shape=dict(mesh.shape),
                               data_hash="x")
    ck.save(3, state, {}, force=True)
    ck.close()
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    proc = _start(["--config", "configs/vla_cabin.py:tiny", "--config.mesh.tensor=2", "--config.mesh.fsdp=3"],
                  tmp_path / "run")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith("error: "), err[-2000:]
    after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    assert after == before


@pytest.mark.parametrize("env,coordinator,want", [
    ({}, None, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}, None, "SLURM"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, None, "TPU"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None, None),
    ({}, "10.0.0.1:1234", "--coordinator_address"),
])
def test_multiprocess_detection(env, coordinator, want):
    from vlacabin_jax.runtime import multiprocess_environment

    assert multiprocess_environment(coordinator, env) == want
