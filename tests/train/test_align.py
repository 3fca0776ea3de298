"""The align stage through the real loop: simulator-scored pairs from `tools.make_preferences` on
the trainer's own checkpoint, then Diffusion-DPO from that checkpoint: the first step at loss
log 2 with margin 0, the frozen reference kept bit for bit across a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.stages import align
from tests.train import runs
from tools import make_preferences
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import loop

pytestmark = pytest.mark.xdist_group("train_loop")


def _align_config(init_from: Path, pairs: Path):
    """configs/stages/align.py:tiny (LoRA on the encoders, DPO on) from `init_from` on the
    recipe's data (the simulator-scored pairs in `pairs` mixed 1:1 with VLA turns), at the loop
    tests' batch, mesh and precision."""
    cfg = align.get_config("tiny")
    cfg.model.dtype = "float32"
    cfg.model.dnfm.layout = runs.OVERRIDES["model.dnfm.layout"]  # the layout of the run it starts from
    cfg.data.update(mixture="preference_sim=1,vla=1", preference_dir=str(pairs))
    cfg.train.update(init_from=str(init_from), global_batch_size=16, log_every=1, eval_every=0)
    cfg.checkpoint.every_steps = 1
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 8, 1, 1
    return cfg


def _state_item(step_dir: Path) -> dict:
    with ocp.PyTreeCheckpointer() as c:
        return c.restore((step_dir / "state").absolute())


def _assert_trees_equal(got: dict, want: dict) -> None:
    import jax

    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_align_starts_at_log2_and_keeps_its_reference_across_a_resume(reference, tmp_path):
    source, _, _ = reference
    source_step = ckpt_lib.read_metadata(source / "checkpoints")["step"]
    # The reference run trains everything but the anchor: its DNFM is in `trainable`.
    source_dnfm = _state_item(source / "checkpoints" / str(source_step))["trainable"]["dnfm"]
    # A few turns of the policy, 4 answers each, scored in the simulator: best vs worst.
    assert make_preferences.main(["--checkpoint", str(source / "checkpoints"), "--out", str(tmp_path / "pairs"),
                                  "--num-samples", "16", "--k", "4", "--batch-size", "16"]) == 0
    n_pairs = json.loads((tmp_path / "pairs" / "manifest.json").read_text())["counts"]["train"]
    assert n_pairs > 0
    cfg = _align_config(source / "checkpoints", tmp_path / "pairs")
    workdir = tmp_path / "align"

    loop.train(cfg, workdir, stop=loop.StopFlag(at_step=1))
    first = runs.rows(workdir)[1]
    # Policy = reference at step 0: every pair's margin is 0 and its loss -log σ(0) = log 2.
    assert first["dpo_pairs"] == 8  # half of the batch: the mixture's preference_sim rows
    assert first["dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert first["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(first["loss"]) and first["velocity"] > 0  # the VLA turns train too
    _assert_trees_equal(_state_item(workdir / "checkpoints" / "1")["reference"]["dnfm"], source_dnfm)

    # Stopped at 1 (as a kill leaves the last checkpoint), resumed to 3: the reference restored
    # from the checkpoint is still the sft params, while the policy's DNFM has moved away.
    loop.train(cfg, workdir, stop=loop.StopFlag(at_step=3))
    assert any(e["event"].startswith("resumed from checkpoint 1") for e in runs.events(workdir))
    assert sorted(runs.rows(workdir)) == [1, 2, 3]
    last = _state_item(workdir / "checkpoints" / "3")
    _assert_trees_equal(last["reference"]["dnfm"], source_dnfm)
    kernel = ("in_proj", "dense", "kernel")
    moved = last["trainable"]["dnfm"]
    want = source_dnfm
    for k in kernel:
        moved, want = moved[k], want[k]
    assert np.abs(np.asarray(moved) - np.asarray(want)).max() > 0
    assert runs.rows(workdir)[3]["dpo_margin"] != 0.0
