"""Optimizer: decay mask, warm-up + cosine schedule, clipping, trainable-only state; train config checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.config import ConfigError, validate
from vlacabin_jax.model import functional
from vlacabin_jax.train import optimizer


def _cfg(**optim):
    cfg = get_config("tiny")
    cfg.train.steps = 100
    cfg.optim.update({"warmup_steps": 10, **optim})
    return cfg


def test_decay_mask_hits_kernels_only():
    trainable, _ = jax.eval_shape(lambda: functional.init_params(_cfg(), jax.random.key(0)))
    flat = {jax.tree_util.keystr(p): m for p, m in
            jax.tree_util.tree_leaves_with_path(optimizer.decay_mask(trainable))}
    decayed = [k for k, m in flat.items() if m]
    assert decayed and all("kernel" in k or "query_to_action" in k for k in decayed)
    for name in ("['bias']", "['scale']", "['queries']['queries']", "['action_codebook']",
                 "['token_embedding']['embedding']", "['position_embedding']", "['modality_embedding']"):
        hits = [k for k in flat if name in k]
        assert hits and not any(flat[k] for k in hits), name


def test_schedule_warmup_then_cosine_to_end_factor():
    cfg = _cfg(lr=1e-3, end_lr_factor=0.1)
    lr = optimizer.learning_rate_fn(cfg)
    values = np.array([float(lr(s)) for s in range(0, 101)])
    assert values[0] == 0.0 and values[10] == pytest.approx(1e-3)
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-12)
    assert values[100] == pytest.approx(1e-4)


def _first_moment(opt_state):
    """Adam's first moment mu = (1 - b1) · (the gradient Adam saw) after one update."""
    return optax.tree_utils.tree_get(opt_state, "mu")


def test_make_optimizer_clips_the_global_norm_before_adam():
    b1 = 0.9
    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}}
    huge = {"dense": {"kernel": jnp.full((4, 4), 3e3), "bias": jnp.full((4,), 4e3)}}  # norm 1.6e4
    small = jax.tree.map(lambda g: g * 1e-5, huge)  # norm 0.16 < clip: untouched
    tx = optimizer.make_optimizer(_cfg(clip_norm=1.0, b1=b1, warmup_steps=0))
    _, state = tx.update(huge, tx.init(params), params)
    seen = jax.tree.map(lambda m: m / (1 - b1), _first_moment(state))
    assert float(optax.tree.norm(seen)) == pytest.approx(1.0, rel=1e-5)
    # Clipping scales, it does not change the direction.
    np.testing.assert_allclose(np.asarray(seen["dense"]["kernel"]) / np.asarray(seen["dense"]["bias"])[0],
                               np.full((4, 4), 0.75), rtol=1e-5)
    _, state = tx.update(small, tx.init(params), params)
    jax.tree.map(lambda m, g: np.testing.assert_allclose(m / (1 - b1), g, rtol=1e-5), _first_moment(state), small)
    # clip_norm = 0: no clipping.
    tx = optimizer.make_optimizer(_cfg(clip_norm=0.0, b1=b1, warmup_steps=0))
    _, state = tx.update(huge, tx.init(params), params)
    jax.tree.map(lambda m, g: np.testing.assert_allclose(m / (1 - b1), g, rtol=1e-5), _first_moment(state), huge)


def test_make_optimizer_decays_exactly_the_masked_leaves_of_the_real_tree():
    """Zero gradient on tiny's whole trainable tree (boxed, as the train state holds it): only
    the leaves `decay_mask` marks move, each by lr · weight_decay · param."""
    lr, wd = 1e-2, 0.5
    cfg = _cfg(lr=lr, weight_decay=wd, warmup_steps=0)
    abstract, _ = jax.eval_shape(lambda: functional.init_params(cfg, jax.random.key(0)))
    # Boxed, every leaf a scalar 2: what is decayed depends on the leaf's path only.
    params = jax.tree.map(lambda x: np.float32(2.0), abstract)
    tx = optimizer.make_optimizer(cfg)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), jax.jit(tx.init)(params), params)
    mask = optimizer.decay_mask(params)
    flat = jax.tree_util.tree_leaves_with_path(nn.unbox(updates))
    decayed = 0
    for (path, u), m in zip(flat, jax.tree.leaves(nn.unbox(mask))):
        want = -lr * wd * 2.0 if m else 0.0
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
        decayed += bool(m)
    assert 0 < decayed < len(flat)
    names = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(nn.unbox(mask))}
    assert not any(m for k, m in names.items() if k.endswith("['bias']") or k.endswith("['scale']"))


@pytest.mark.parametrize("field,value,match", [
    ("train.stage", "align", "needs train.init_from"),
    ("train.stage", "rlhf", "train.stage"),
    ("train.eval_every", 7, "multiple of train.log_every"),
    ("optim.lr", -1.0, "optim.lr"),
    ("optim.b2", 1.5, "optim.b1"),
    ("checkpoint.keep", 0, "checkpoint.keep"),
    ("train.grad_accum_steps", 3, "grad_accum_steps"),
    ("mesh.tensor", 3, "does not divide model"),
])
def test_train_config_checks(field, value, match):
    cfg = get_config("tiny")
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_stage_configs_validate():
    from configs.stages import align, pretrain, sft

    for mod, stage in ((pretrain, "pretrain"), (sft, "sft")):
        cfg = mod.get_config("tiny")
        validate(cfg)
        assert cfg.train.stage == stage
    assert sft.get_config("tiny").data.mixture == "vla=1"
    with pytest.raises(ConfigError, match="align' needs train.init_from"):
        validate(align.get_config("tiny"))  # the sft run's checkpoint is its start and reference
