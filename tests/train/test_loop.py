"""The training loop end to end on 8 simulated CPU devices: the loss falls, meshes agree, a NaN
rolls back, resume onto another mesh. Signals, kills and multi-process runs: test_multiprocess.py.

Note on XLA:CPU: with 8 simulated devices on a 2-core machine, multi-axis meshes such as 2x2x2
(hundreds of all-to-alls) can deadlock inside XLA's CPU runtime: devices running independent
collectives concurrently take all of the client's threads and the remaining devices never start;
XLA then aborts the process. So that mesh runs as a `python -m launch` subprocess that is resumed
from its last checkpoint when XLA aborts it (a resume continues a run exactly).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.train import runs
from tests.train.runs import STEPS
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import loop

# One worker runs this group (`--dist loadgroup`), so its in-process runs share compiled programs;
# the reference run (tests/train/conftest.py) is computed once per session.
pytestmark = pytest.mark.xdist_group("train_loop")


def test_loss_falls_and_workdir_contract(reference):
    workdir, summary, rows = reference
    assert sorted(rows) == list(range(1, STEPS + 1)) and summary.step == STEPS and not summary.preempted
    def fall(key):  # step 1 vs the median of the last 10 steps (single steps are noisy at batch 16)
        return rows[1][key], float(np.median([rows[s][key] for s in range(STEPS - 9, STEPS + 1)]))

    first, last = fall("loss")
    print(f"\nloss {first:.3f} at step 1 -> {last:.3f} (median of the last 10 steps); "
          f"{summary.step_time_s * 1e3:.0f} ms/step, {summary.samples_per_s:.0f} samples/s; "
          f"compile {summary.compile_s:.0f} s")
    assert last < 0.6 * first
    for key in ("endpoint_ce", "source_ce", "explanation_ce", "velocity"):
        start, end = fall(key)
        assert end < 0.8 * start, (key, start, end)
    for key in ("loss", "velocity", "endpoint_ce", "source_ce", "path", "explanation_ce", "kl_latent",
                "infonce", "grad_norm", "learning_rate", "step_time_s", "samples_per_s", "data_wait_fraction"):
        assert key in rows[STEPS], key
    assert "mfu" not in rows[STEPS]  # no peak FLOP/s known for CPU
    assert "eval/loss" in rows[40] and "eval/loss" in rows[STEPS] and "eval/loss" not in rows[39]
    # The cabin metrics of sampled actions sit beside the heldout losses (16 VLA turns, 4 + 4 pairs).
    for key in ("eval/success_rate", "eval/violation_rate", "eval/explanation_token_accuracy",
                "eval/retrieval/text->video/R@1", "eval/retrieval/state->text/R@1"):
        assert key in rows[40] and key in rows[STEPS] and 0.0 <= rows[STEPS][key] <= 1.0, key
    assert rows[STEPS]["eval/n"] == 16
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())
    assert ckpt_lib.read_metadata(workdir / "checkpoints")["step"] == STEPS
    # Goodput: the parts and the productive rest add up to the wall time of the call.
    g = summary.goodput
    parts = ("startup_s", "compile_s", "data_wait_s", "checkpoint_s", "eval_s", "rollback_s", "productive_s")
    assert sum(g[k] for k in parts) == pytest.approx(g["total_s"], rel=1e-3)
    assert 0.0 < g["goodput"] < 1.0 and g["rollback_s"] == 0.0
    assert min(g["startup_s"], g["compile_s"], g["checkpoint_s"], g["eval_s"]) > 0.0
    assert any(e["event"].startswith("goodput") and e["goodput"] == pytest.approx(g["goodput"], abs=0.05)
               for e in runs.events(workdir))
    print("goodput: " + ", ".join(f"{k}={v:.2f}" for k, v in g.items()))


def test_mesh_agrees_and_resume_onto_another_mesh(reference, tmp_path):
    """2x2x2 shards the batch over data and fsdp, params over fsdp and tensor: the losses of
    8x1x1 within float tolerance; its checkpoint then continues on 8x1x1."""
    _, _, want = reference
    stop_at, mesh = 4, (2, 2, 2)
    workdir = tmp_path / "2x2x2"
    _run_until_done(workdir, mesh, stop_at)
    got = runs.rows(workdir)
    for s in range(1, stop_at + 1):
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=2e-4, err_msg=f"{mesh} step {s}")
    summary = loop.train(runs.config((8, 1, 1)), workdir, stop=loop.StopFlag(at_step=stop_at + 3))
    assert summary.restored_from == stop_at and summary.step == stop_at + 3
    resumed = [e["event"] for e in runs.events(workdir) if e["event"].startswith("resumed")]
    assert f"resumed from checkpoint {stop_at}" in resumed[-1]
    got = runs.rows(workdir)
    for s in range(stop_at + 1, stop_at + 4):
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=2e-3, err_msg=f"resumed step {s}")


def test_nan_batch_rolls_back_and_is_skipped(reference, tmp_path):
    _, _, want = reference
    cfg = runs.config(**{"train.inject_nan_batch": 6, "checkpoint.every_steps": 4, "train.log_every": 2,
                  "train.profile_steps": 2, "train.profile_start": 2})
    summary = loop.train(cfg, tmp_path / "nan", stop=loop.StopFlag(at_step=10))
    assert list((tmp_path / "nan" / "profile").rglob("*.xplane.pb"))  # jax.profiler trace of steps 2-3
    assert summary.rollbacks == 1 and summary.step == 10
    assert summary.goodput["rollback_s"] > 0.0
    rollback = [e for e in runs.events(tmp_path / "nan") if "rolled back" in e["event"]]
    assert len(rollback) == 1 and rollback[0]["restored"] == 4 and rollback[0]["bad_batch"] == 6
    got = runs.rows(tmp_path / "nan")
    # Replayed from checkpoint 4: steps 5-6 again, the same (rows here average 2 steps).
    assert got[6]["loss"] == pytest.approx((want[5]["loss"] + want[6]["loss"]) / 2, rel=1e-6)
    assert got[8]["loss"] != pytest.approx((want[7]["loss"] + want[8]["loss"]) / 2, rel=1e-3)  # batch 6 skipped
    assert all(np.isfinite(r["loss"]) for r in got.values())
    meta = ckpt_lib.read_metadata(tmp_path / "nan" / "checkpoints")
    assert meta["step"] == 10 and meta["loop"] == {"rollbacks": 1, "skipped_batches": [6]}

    # With no rollbacks allowed it stops with a clear error and leaves good checkpoints only.
    cfg.train.update(max_rollbacks=0, profile_steps=0)
    with pytest.raises(loop.TrainingError, match="non-finite loss at step 7 .data batch 6."):
        loop.train(cfg, tmp_path / "nan_strict")
    assert ckpt_lib.read_metadata(tmp_path / "nan_strict" / "checkpoints")["step"] == 4


def _run_until_done(workdir, mesh, stop_at: int, attempts: int = 6) -> None:
    """`python -m launch` on `mesh` up to step `stop_at`, checkpointing every step. XLA:CPU can abort
    a multi-axis mesh run with a collective deadlock (module docstring); the run is then resumed
    from its last checkpoint, which continues it exactly. XLA is told to give up on a stuck
    collective after 10 s instead of 40 s."""
    data, fsdp, tensor = mesh
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
               " --xla_cpu_collective_call_terminate_timeout_seconds=10"
               " --xla_cpu_collective_call_warn_stuck_timeout_seconds=5")
    for _ in range(attempts):
        proc = runs.start(workdir, flags=[f"--stop_at_step={stop_at}"], env=env,
                          **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                             "checkpoint.every_steps": 1})
        if proc.wait(timeout=600) == 0:
            return
        if "Termination timeout" not in runs.log_of(workdir):
            pytest.fail(f"{mesh} run failed:\n{runs.log_of(workdir)[-3000:]}")
    pytest.fail(f"{mesh}: XLA:CPU deadlocked {attempts} times in a row on this machine (see the module "
                f"docstring); {Path(workdir).with_suffix('.log')}")
