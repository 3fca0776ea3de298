"""Gradient accumulation trains the full batch's objective, for the real `loss_fn`.

Every loss term is a masked mean (a sum over the rows or tokens it covers / their count). With
`train.grad_accum_steps = A` the step must give the loss, every metric and the gradient of the
full batch, also when the masks (`has_actions`, modality masks, explanation padding, preference
pairs) are spread unevenly over the microbatches. The one term that cannot equal the full
batch's is InfoNCE: its negatives are the other rows of the same microbatch, so its rows are
each microbatch's and its value is their row-weighted mean (see `train/step.py`).

The noise: `jax.random` draws depend on the shape asked for, so a microbatch of B / A rows
cannot draw what the same rows drew in the full batch. The model's draws (`normal`, `uniform`,
`randint` in `VLACabin.train_outputs`) are replaced by constants for this test; everything
else, every mask and every term, is the real code.

The same reference gradient checks the stop-gradient of `loss_fn`: w.r.t. the frozen tree
(anchor, LoRA base weights) it is exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.vla_cabin import BALANCED_MIXTURE, get_config
from vlacabin_jax import sharding
from vlacabin_jax.data import pipeline
from vlacabin_jax.data.spec import MODALITIES
from vlacabin_jax.model import functional
from vlacabin_jax.train import state as state_lib
from vlacabin_jax.train import step as step_lib

ACCUM = 2
BATCH = 16


def _cfg():
    """tiny, fp32, the align stage's layout (LoRA adapters on the encoders, the anchor and the
    encoders' base weights frozen), every loss term of the model on: the DPO loss (a reference),
    the KL past its warm-up start. (The autoregressive head's terms are ladder-only; their
    accumulation is checked in tests/model/test_losses.py.)"""
    cfg = get_config("tiny")
    cfg.model.dtype = "float32"
    cfg.model.lora.rank = 4
    cfg.data.mixture = BALANCED_MIXTURE  # the rows `_uneven` spreads
    cfg.train.update(stage="align", trainable="lora_and_heads", global_batch_size=BATCH, grad_accum_steps=ACCUM)
    cfg.loss.update(dpo_weight=1.0, kl_warmup_steps=10)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 8, 1, 1
    return cfg


def _uneven(batch: dict) -> dict:
    """A data batch with masks spread unevenly over the microbatches (microbatch a holds rows
    a, a + A, …): most action targets, preference pairs and speech in microbatch 0, most
    explanations, state and video in microbatch 1, explanation lengths all different."""
    b = {k: np.array(v) for k, v in batch.items() if k not in step_lib.HOST_ONLY_FIELDS}
    rows = np.arange(BATCH)
    micro0 = rows % ACCUM == 0
    b["has_actions"] = micro0 & (rows != 0) | (rows == 1)              # 7 rows vs 1
    b["has_pair"] = micro0 & ~b["has_actions"] | (rows == 3) | (rows == 5)  # 1 row vs 2
    b["rejected_tokens"] = np.roll(b["action_tokens"], 1, axis=1)
    idx = {m: i for i, m in enumerate(MODALITIES)}
    b["modality_mask"][:, idx["speech"]] = micro0 | (rows == 7)
    b["modality_mask"][:, idx["state"]] = ~micro0 | (rows == 2)
    b["modality_mask"][:, idx["video"]] = ~micro0 & (rows < 12)
    length = b["explanation_mask"].shape[1]
    b["explanation_mask"] = np.arange(length)[None, :] < np.where(micro0, 2, 3 + rows % (length - 3))[:, None]
    return b


@pytest.fixture
def fixed_noise(monkeypatch):
    """The model's random draws as constants of the asked shape (nonzero, so every path of the
    reparameterisation and the time sampling is exercised; t = 1 - 0.4^(1/t_beta), dt = 0.25)."""
    monkeypatch.setattr(jax.random, "normal", lambda key, shape=(), dtype=jnp.float32, *a, **k:
                        jnp.full(shape, 0.5, dtype))
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0:
                        jnp.full(shape, 0.6, dtype))
    monkeypatch.setattr(jax.random, "randint", lambda key, shape, minval, maxval, dtype=jnp.int32:
                        jnp.full(shape, minval + 1, dtype))


def _reference(cfg, state, batch):
    """The full batch's (metrics, grads w.r.t. trainable, grads w.r.t. frozen), InfoNCE taken per
    microbatch as the step does.

    loss = loss_fn(full batch) - w · infonce(full batch) + w · Σ_a rows_a · infonce_a / Σ_a rows_a
    """
    w = float(cfg.loss.infonce_weight)
    rngs = step_lib._step_rngs(state.rng, state.step, 0)  # constant draws: any key will do
    ref = state.reference

    def loss(params, frozen):
        full_loss, m = functional.loss_fn(params, frozen, batch, rngs, cfg, state.step, ref)
        # Microbatch a holds rows a, a + A, …; lax.map traces (and compiles) the loss once for all.
        micros = jax.tree.map(lambda x: jnp.stack([x[a::ACCUM] for a in range(ACCUM)]), batch)
        nce, nce_rows = jax.lax.map(lambda micro: [functional.loss_fn(
            params, frozen, micro, rngs, cfg, state.step, ref)[1][k] for k in ("infonce", "infonce_rows")], micros)
        rows = nce_rows.sum()
        nce = (nce * nce_rows).sum() / jnp.maximum(rows, 1.0)
        total = full_loss - w * m["infonce"] + w * nce
        return total, dict(m, loss=total, infonce=nce, infonce_rows=rows)

    (_, metrics), (grads, frozen_grads) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        state.trainable, state.frozen)
    return metrics, grads, frozen_grads


def _largest_differences(got_m, want_m, got_g, want_g) -> tuple[float, str, float]:
    """(largest |metric difference| relative to max(|want|, 1), the metric it is on, largest
    |grad difference| relative to the largest |grad| of all)."""
    rel = {k: abs(float(got_m[k]) - float(want_m[k])) / max(abs(float(want_m[k])), 1.0) for k in want_m}
    worst = max(rel, key=rel.get)
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want_g))
    g = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
    return rel[worst], worst, g / scale


def test_accumulated_step_equals_the_full_batch_on_uneven_masks(fixed_noise):
    cfg = _cfg()
    mesh = sharding.make_mesh(cfg.mesh)
    state, shardings = state_lib.create_train_state(cfg, mesh)
    state = state.replace(step=jnp.asarray(5, jnp.int32))  # KL weight 0.5 · kl_weight
    host = _uneven(next(pipeline.make_dataset(cfg, global_batch_size=BATCH, seed=0)))
    batch = step_lib.device_batch(host, step_lib.batch_shardings(cfg, mesh), BATCH)

    want_m, want_g, frozen_g = _reference(cfg, state, batch)
    # loss_fn itself stops the gradient into the frozen tree (the anchor, the encoders' base
    # weights): exactly zero, not merely left out of the update.
    assert {"vit", "lm", "text_encoder"} <= set(frozen_g)
    for path, g in jax.tree_util.tree_leaves_with_path(frozen_g):
        assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)
    # The masks are uneven indeed, and every term is on.
    for name in ("kl_latent", "kl_z0", "infonce", "recon_state_numeric", "recon_state_categorical",
                 "recon_mel", "recon_visual", "velocity", "endpoint_ce", "source_ce", "path",
                 "explanation_ce", "dpo_loss", "kl_scale"):
        assert float(want_m[name]) > 0, name
    assert float(want_m["dpo_pairs"]) == 3 and float(want_m["infonce_rows"]) > 0

    grads_fn = jax.jit(lambda s, b: step_lib._grads_and_metrics(cfg, s, b, mesh, shardings.trainable))
    got_g, got_m = grads_fn(state, batch)
    assert set(got_m) == set(want_m)
    metric_diff, worst, grad_diff = _largest_differences(got_m, want_m, got_g, want_g)
    print(f"largest metric difference {metric_diff:.3g} ({worst}), largest grad difference {grad_diff:.3g}")
    for k in want_m:
        np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    # Relative to the largest gradient of all: leaves whose true gradient is 0 (an attention
    # key's bias) hold float noise only.
    atol = 1e-5 * max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want_g))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))
