"""Fixtures of the export tests: a checkpoint from a short real training run, saved in the
trainer's Orbax format, shared by every test (and every xdist worker) of a session.

The run: `steps` Adam updates of the full training loss (`functional.loss_fn`) on featurized
synthetic-world samples, from `functional.init_params`; then `vlacabin_jax.train.checkpoint.
Checkpointer.save`. Trained params matter here: a fresh init has zero-initialised DNFM output and
modulation kernels, so the sampler's velocities would be exactly 0 and the DNFM untested.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from configs.vla_cabin import get_config

TRAIN_STEPS = 20
TRAIN_BATCH = 8


def world_training_batch(cfg, size: int, seed: int = 7) -> dict[str, np.ndarray]:
    """Featurized synthetic-world VLA turns with targets, all four modalities present.

    Only complete samples: a sample with an absent modality gives NaN gradients in the current
    model (`losses.py` InfoNCE normalises the all-zero pooled latent of the absent modality with
    `jnp.linalg.norm`, whose gradient at 0 is NaN; `jnp.maximum(norm, 1e-6)` does not stop it).
    The export itself is verified on every kind, absent modalities included.
    """
    from vlacabin_jax.data import features, world
    from vlacabin_jax.data.actions import ActionVocabulary

    tokenizer, vocab = features.load_tokenizer(None), ActionVocabulary()
    rows, index = [], 0
    while len(rows) < size:
        sample = world.generate(seed, index, "vla", cfg.model.vit.image_size, cfg.data.num_frames,
                                cfg.model.speech.n_mels, cfg.data.mel_frames)
        index += 1
        row = features.featurize(sample, cfg, tokenizer, vocab)
        if row["modality_mask"].all():
            rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def variant_config(variant: str, overrides: dict | None = None):
    """`get_config(variant)` with {"a.b.c": value} overrides applied."""
    cfg = get_config(variant)
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def train_and_save(variant: str, directory: Path, steps: int = TRAIN_STEPS, overrides: dict | None = None) -> Path:
    """Train `steps` steps and save one checkpoint; returns `<directory>/checkpoints`.

    `steps=0` skips the training (and its compilation, minutes for `small` on CPU): every param
    of a fresh init gets Gaussian noise instead, so no kernel is zero and the DNFM path is live.
    `overrides`: config fields changed from the preset ({"train.trainable": "all_and_anchor"}).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from vlacabin_jax.model import functional
    from vlacabin_jax.train import checkpoint as ckpt_lib
    from vlacabin_jax.train.state import TrainState

    cfg = variant_config(variant, overrides)
    trainable, frozen = functional.init_params(cfg, jax.random.key(0))
    trainable = nn.unbox(trainable)
    frozen = jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.model.anchor_dtype)), nn.unbox(frozen))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(trainable)
    batch = world_training_batch(cfg, TRAIN_BATCH)

    @jax.jit
    def step(params, opt_state, i):
        rngs = {"latent": jax.random.fold_in(jax.random.key(1), i), "flow": jax.random.fold_in(jax.random.key(2), i)}
        (loss, _), grads = jax.value_and_grad(
            lambda p: functional.loss_fn(p, frozen, batch, rngs, cfg, i), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if steps == 0:
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        trainable = treedef.unflatten([x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    losses = []
    for i in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state, i)
        losses.append(float(loss))
    assert np.isfinite(losses).all(), losses
    assert len(losses) < 10 or losses[-1] < losses[0], losses  # a few steps are noise (random t, latents)
    state = TrainState(step=jnp.int32(steps), trainable=trainable, frozen=frozen, opt_state=opt_state,
                       rng=jnp.zeros((2,), jnp.uint32))
    checkpoints = directory / "checkpoints"
    ckpt = ckpt_lib.Checkpointer(checkpoints, cfg, mesh_shape={"data": 1, "fsdp": 1, "tensor": 1},
                                 data_hash="export-test")
    assert ckpt.save(steps, state, {"version": 1}, force=True)
    ckpt.close()
    return checkpoints


def _shared_root(tmp_path_factory) -> Path:
    """A directory all xdist workers of this session share (the session's own when not distributed)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def trained_checkpoint(tmp_path_factory, variant: str, steps: int = TRAIN_STEPS, overrides: dict | None = None,
                       name: str = "") -> Path:
    """The session's trained checkpoint of `variant` (trained once, by whichever worker comes first);
    give a distinct `name` with `overrides`."""
    root = _shared_root(tmp_path_factory) / f"export-{variant}{'-' + name if name else ''}-run"
    with FileLock(str(root) + ".lock"):
        done = root / "DONE"
        if not done.exists():
            root.mkdir(parents=True, exist_ok=True)
            train_and_save(variant, root, steps, overrides)
            done.write_text("ok")
    return root / "checkpoints"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_source(tiny_checkpoint):
    from vlacabin_jax.export.source import from_checkpoint

    return from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_reference(tiny_source):
    """The JAX reference of the trained tiny model, compiled once per worker."""
    from vlacabin_jax.export import verify

    return verify.JaxReference(tiny_source.cfg, tiny_source.trainable, tiny_source.frozen, steps=4)
