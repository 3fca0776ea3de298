"""LoRA on the modality encoders: zero-init adapters change nothing, merging them into the kernels
gives the adapted outputs, and under `train.trainable = "lora_and_heads"` gradients reach the
adapters but not the frozen base weights.

Cheap on purpose (the suite is at its time budget): the param values are drawn at random on the
shapes of `init_params` (traced, not compiled); the adapters' own init is checked on one Dense.
Two compiled encoder programs serve every check: the adapted one with its gradient, the plain one.
The heads' gradients are the full model's (`test_vla_cabin.py`); which params are heads is the split.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.vla_cabin import get_config
from tests.model.conftest import random_batch
from vlacabin_jax.model import functional as F
from vlacabin_jax.model import layers, lora
from vlacabin_jax.model.vla_cabin import HEAD_KEYS, VLACabin

ENCODERS = ("speech_encoder", "text_encoder", "video_encoder", "state_encoder")


def _cfg(rank: int, trainable: str):
    cfg = get_config("tiny")
    cfg.model.dtype = cfg.model.anchor_dtype = "float32"
    cfg.model.lora.update(rank=rank, alpha=8.0, targets=",".join(lora.TARGETS))
    cfg.train.trainable = trainable
    return cfg


def _paths(tree) -> list[tuple[str, ...]]:
    return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _draw(tree, seed: int, adapters_only: bool = False, zero_b: bool = False):
    """Random values (scale 0.1) on a tree of shapes or arrays; B = 0 with `zero_b` (its init)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        if name == "lora_b" and zero_b:
            return np.zeros(x.shape, x.dtype)
        if adapters_only and name not in lora.ADAPTER_NAMES:
            return x
        return (0.1 * rng.normal(size=x.shape)).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(draw, tree)


def _encode(cfg, params, batch) -> dict:
    """The encoders' Gaussian tokens: {"mean", "logvar": [b, modalities, tokens, d_latent]}."""
    out = VLACabin(cfg.model).apply({"params": params}, batch, method=VLACabin.encode)
    return {k: out[k] for k in ("mean", "logvar")}


@pytest.fixture(scope="module")
def setup():
    cfg, plain = _cfg(4, "lora_and_heads"), _cfg(0, "all")
    trainable, frozen = (nn.unbox(t) for t in jax.eval_shape(lambda: F.init_params(cfg, jax.random.key(0))))
    trainable, frozen = _draw(trainable, 0, zero_b=True), _draw(frozen, 1)

    def adapted(t, f, batch):  # encoder outputs and the gradient of their sum, frozen as in loss_fn
        out, vjp = jax.vjp(lambda t, f: _encode(cfg, F.merge_params(t, jax.lax.stop_gradient(f)), batch), t, f)
        return out, vjp({k: jnp.ones_like(v) for k, v in out.items()})

    programs = {"lora": jax.jit(adapted), "plain": jax.jit(lambda p, b: _encode(plain, p, b))}
    return cfg, trainable, frozen, programs, random_batch(cfg, 2)


def test_split_follows_train_trainable(setup):
    cfg, trainable, frozen, _, _ = setup
    assert set(trainable) == set(HEAD_KEYS) | set(ENCODERS)
    for path in _paths(trainable):
        assert path[0] in HEAD_KEYS or lora.is_adapter(path), path
    frozen_paths = _paths(frozen)
    assert {"vit", "lm", "bridge_inputs", "queries", "reconstruction"} | set(ENCODERS) == {p[0] for p in frozen_paths}
    assert not any(lora.is_adapter(p) for p in frozen_paths)
    # Every targeted Dense of every encoder has both matrices; B starts at zero, A does not.
    adapters = [p for p in _paths(trainable) if lora.is_adapter(p)]
    assert {p[0] for p in adapters} == set(ENCODERS)
    assert {p[-2] for p in adapters} == set(lora.TARGETS)
    merged = F.merge_params(trainable, frozen)
    # The same tree under "all": only the anchor is frozen, the adapters train with everything else.
    t_all, f_all = F.split_params(merged, _cfg(4, "all"))
    assert set(f_all) == {"vit", "lm"} and len(_paths(t_all)) + len(_paths(f_all)) == len(_paths(merged))


def test_adapter_init_b_zero_a_random():
    dense = layers.Dense((3, 4), ("embed", "heads", "head_dim"), lora_rank=2, lora_scale=4.0)
    boxed = dense.init(jax.random.key(0), np.ones((1, 5), np.float32))["params"]
    params, axes = nn.unbox(boxed), nn.get_partition_spec(boxed)
    assert params["lora_a"].shape == (5, 2) and params["lora_b"].shape == (2, 3, 4)
    assert not np.asarray(params["lora_b"]).any() and np.asarray(params["lora_a"]).all()
    assert tuple(axes["lora_a"]) == ("embed", "lora") and tuple(axes["lora_b"]) == ("lora", "heads", "head_dim")


def test_zero_init_adapters_give_the_outputs_without_them(setup):
    _, trainable, frozen, programs, batch = setup
    stripped = lora.merge(F.merge_params(trainable, frozen), 2.0)  # B = 0: kernels unchanged, adapters gone
    assert not any(lora.is_adapter(p) for p in _paths(stripped))
    with_adapters, _ = programs["lora"](trainable, frozen, batch)
    without = programs["plain"](stripped, batch)
    for key in ("mean", "logvar"):
        np.testing.assert_array_equal(np.asarray(with_adapters[key]), np.asarray(without[key]), err_msg=key)


def test_merged_adapters_give_the_adapted_outputs(setup):
    cfg, trainable, frozen, programs, batch = setup
    trainable = _draw(trainable, 3, adapters_only=True)
    adapted, _ = programs["lora"](trainable, frozen, batch)
    merged = programs["plain"](F.merge_lora(F.merge_params(trainable, frozen), cfg), batch)
    base = programs["plain"](lora.merge(F.merge_params(_draw(trainable, 0, zero_b=True, adapters_only=True),
                                                       frozen), 2.0), batch)
    for key in ("mean", "logvar"):
        a, m, b = (np.asarray(x[key]) for x in (adapted, merged, base))
        assert np.abs(a - b).max() > 1e-2, key  # the adapters do change the outputs...
        np.testing.assert_allclose(m, a, rtol=1e-5, atol=1e-5, err_msg=key)  # ...and merge exactly


def test_merge_folds_unscanned_and_per_head_kernels():
    """W + scale · A @ B for a plain [in, out] kernel and a per-head [H, hd, out] one."""
    rng = np.random.default_rng(0)
    w, a, b = (rng.normal(size=s).astype(np.float32) for s in ((6, 5), (6, 2), (2, 5)))
    wh, ah, bh = (rng.normal(size=s).astype(np.float32) for s in ((3, 4, 6), (3, 4, 2), (2, 6)))
    tree = {"x": {"dense": {"kernel": w, "bias": np.ones(5, np.float32)}, "lora_a": a, "lora_b": b},
            "out": {"dense": {"kernel": wh}, "lora_a": ah, "lora_b": bh}}
    merged = lora.merge(tree, 0.5)
    assert set(merged["x"]) == {"dense"} and set(merged["out"]) == {"dense"}
    np.testing.assert_allclose(merged["x"]["dense"]["kernel"], w + 0.5 * a @ b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["out"]["dense"]["kernel"], wh + 0.5 * np.einsum("hdr,ro->hdo", ah, bh),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["x"]["dense"]["bias"], np.ones(5))


def test_gradients_reach_adapters_not_frozen_weights(setup):
    _, trainable, frozen, programs, batch = setup
    trainable = _draw(trainable, 4, adapters_only=True)  # with B = 0 the gradient of A is exactly 0
    _, (g_trainable, g_frozen) = programs["lora"](trainable, frozen, batch)
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(g_frozen))
    for path, g in zip(_paths(g_trainable), jax.tree.leaves(g_trainable)):
        if path[0] in ENCODERS:
            assert np.asarray(g).any(), path
