"""Optimizer: decay mask, warm-up + cosine schedule, clipping, trainable-only state; train config checks."""

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


def test_clipping_and_weight_decay_mask():
    cfg = _cfg(lr=1e-2, clip_norm=1.0, weight_decay=0.5, warmup_steps=0)
    tx = optimizer.make_optimizer(cfg)
    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
              "ln": {"scale": jnp.ones((4,))}}
    state = tx.init(params)
    # Zero gradient: only the kernel moves (decoupled weight decay), norms and biases stay.
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0 == float(jnp.abs(updates["ln"]["scale"]).max())
    # A huge gradient is clipped to global norm 1 before Adam sees it.
    huge = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), params)
    clip_state = optax.clip_by_global_norm(1.0)
    clipped, _ = clip_state.update(huge, clip_state.init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    updates, _ = tx.update(huge, state, params)
    assert np.isfinite(float(optax.tree.norm(updates)))


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
