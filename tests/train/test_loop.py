"""The training loop end to end on 8 simulated CPU devices: the loss falls, the workdir contract,
goodput, a NaN rolls back, a resume on another mesh gives the same losses. Signals, kills,
resume across process counts: test_multiprocess.py. Meshes: the same losses on every mesh are
checked by `python -m tools.mesh_bench`; here one multi-axis mesh only (each mesh is a fresh
compile of minutes on 2 cores); sharding itself by tests/test_sharding.py and the cross-mesh
restore of arrays by test_checkpoint.py.
"""

import json
import shutil

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
    # Batch 6 skipped: the run differs from here on (a replay matches to 1e-6, as above; the
    # difference itself can be small, 5e-4 relative with the per-setting DNFM).
    assert got[8]["loss"] != pytest.approx((want[7]["loss"] + want[8]["loss"]) / 2, rel=1e-5)
    assert all(np.isfinite(r["loss"]) for r in got.values())
    meta = ckpt_lib.read_metadata(tmp_path / "nan" / "checkpoints")
    assert meta["step"] == 10 and meta["loop"] == {"rollbacks": 1, "skipped_batches": [6]}

    # With no rollbacks allowed it stops with a clear error and leaves good checkpoints only.
    cfg.train.update(max_rollbacks=0, profile_steps=0)
    with pytest.raises(loop.TrainingError, match="non-finite loss at step 7 .data batch 6."):
        loop.train(cfg, tmp_path / "nan_strict")
    assert ckpt_lib.read_metadata(tmp_path / "nan_strict" / "checkpoints")["step"] == 4


def test_resume_on_a_mesh_with_fsdp_and_tensor_axes_gives_the_same_losses(reference, tmp_path):
    """The reference run's step-1 checkpoint (saved on data=8) resumed on data=2, fsdp=2, tensor=2:
    steps 2 and 3 give the reference run's losses, every term, to float tolerance."""
    source, _, want = reference
    workdir = tmp_path / "mesh222"
    shutil.copytree(source / "checkpoints" / "1", workdir / "checkpoints" / "1")
    summary = loop.train(runs.config(mesh=(2, 2, 2)), workdir, stop=loop.StopFlag(at_step=3))
    assert summary.step == 3
    resumed = [e["event"] for e in runs.events(workdir) if e["event"].startswith("resumed")]
    assert resumed == ["resumed from checkpoint 1 (saved on mesh {'data': 8, 'fsdp': 1, 'tensor': 1}, "
                       "now {'data': 2, 'fsdp': 2, 'tensor': 2})"]
    got = runs.rows(workdir)
    assert sorted(got) == [2, 3]
    terms = ("loss", "kl_latent", "kl_z0", "infonce", "recon_state_numeric", "recon_mel", "velocity",
             "endpoint_ce", "source_ce", "path", "explanation_ce", "grad_norm")
    for step in (2, 3):
        for key in terms:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_a_learning_anchor_is_refused_across_processes(monkeypatch, tmp_path):
    """Known gap: a resumed multi-process run with train.trainable=all_and_anchor aborted in gloo;
    the trainer refuses it with one line before it writes anything."""
    from configs.vla_cabin import get_config
    from vlacabin_jax.config import ConfigError
    from vlacabin_jax.train import loop

    cfg = get_config("tiny")
    assert cfg.train.trainable == "all_and_anchor"
    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="not supported across processes yet; use --config.train.trainable=all"):
        loop.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
