"""The full model: every loss term, masking of missing modalities, gradients, inference."""
import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model.conftest import random_batch
from vlacabin_jax.data.spec import MODALITIES
from vlacabin_jax.model import functional as F

TERMS = ("kl_latent", "kl_z0", "infonce", "recon_state_numeric", "recon_state_categorical", "recon_mel",
         "recon_visual", "velocity", "endpoint_ce", "source_ce", "path", "explanation_ce")
RNGS = {"latent": jax.random.key(1), "flow": jax.random.key(2)}
# One worker runs this module, so the loss-and-gradient program of `model` compiles once.
pytestmark = pytest.mark.xdist_group("vla_cabin")


@pytest.fixture(scope="module")
def model(tiny_cfg):
    trainable, frozen = F.init_params(tiny_cfg, jax.random.key(0))
    trainable, frozen = nn.unbox(trainable), nn.unbox(frozen)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, f, b: F.loss_fn(p, f, b, RNGS, tiny_cfg, 100), has_aux=True))
    return trainable, frozen, grad_fn


@pytest.mark.parametrize("mode", ["all", "all_and_anchor"])
def test_params_split_and_dtypes(tiny_cfg, mode):
    cfg = ml_collections.ConfigDict(tiny_cfg.to_dict())
    cfg.train.trainable = mode
    trainable, frozen = jax.eval_shape(lambda: F.init_params(cfg, jax.random.key(0)))
    trainable, frozen = nn.unbox(trainable), nn.unbox(frozen)
    anchor = {"vit", "lm"}
    if mode == "all":  # the frozen anchor, stored in anchor_dtype
        assert set(frozen) == anchor and not anchor & set(trainable)
        assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(cfg.model.anchor_dtype)}
    else:  # an anchor that learns: fp32 master weights like the rest
        assert frozen == {} and anchor <= set(trainable)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(cfg.model.param_dtype)}


def test_every_loss_term_is_reported_and_finite(model, tiny_cfg):
    trainable, frozen, grad_fn = model
    (loss, metrics), grads = grad_fn(trainable, frozen, random_batch(tiny_cfg, 4))
    for term in TERMS:
        assert term in metrics and np.isfinite(float(metrics[term])), term
        assert float(metrics[term]) > 0, term
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    # Gradients reach every trainable module, the queries through the frozen LM included.
    for name, sub in grads.items():
        norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(sub))))
        assert norm > 0, f"no gradient reaches {name}"


def test_absent_modality_is_masked_not_zero_filled(model, tiny_cfg):
    """An absent modality's inputs, whatever they hold, change nothing; InfoNCE counts only pairs
    of present modalities."""
    trainable, frozen, grad_fn = model
    batch = random_batch(tiny_cfg, 4)
    video, speech = MODALITIES.index("video"), MODALITIES.index("speech")
    batch["modality_mask"][0, video] = False
    batch["modality_mask"][1, speech] = False
    (loss_a, m_a), grads_a = grad_fn(trainable, frozen, batch)
    # Absent modalities pool to zeros: their gradients must stay finite, not NaN.
    for path, g in jax.tree_util.tree_leaves_with_path(grads_a):
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
    garbage = dict(batch)
    rng = np.random.default_rng(7)
    garbage["frames"] = batch["frames"].copy()
    garbage["frames"][0] = rng.integers(0, 256, size=batch["frames"][0].shape, dtype=np.uint8)
    garbage["mel"] = batch["mel"].copy()
    garbage["mel"][1] = 50.0 * rng.normal(size=batch["mel"][1].shape)
    (loss_b, m_b), _ = grad_fn(trainable, frozen, garbage)
    for k in m_a:
        np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    # 4 samples x 6 pairs x 2 directions, less the 3 + 3 pairs that lose a modality.
    assert float(m_a["infonce_rows"]) == 2 * (4 * 6 - 3 - 3)
    # ...whereas the same change in a present modality does change the loss.
    batch["modality_mask"][0, video] = True
    garbage["modality_mask"] = batch["modality_mask"]
    (loss_c, _), _ = grad_fn(trainable, frozen, batch)
    (loss_d, _), _ = grad_fn(trainable, frozen, garbage)
    assert abs(float(loss_c) - float(loss_d)) > 1e-4


def test_samples_without_targets_do_not_enter_action_losses(model, tiny_cfg):
    trainable, frozen, grad_fn = model
    batch = random_batch(tiny_cfg, 4)
    batch["has_actions"][:] = False
    batch["explanation_mask"][:] = False
    (_, metrics), _ = grad_fn(trainable, frozen, batch)
    for term in ("velocity", "endpoint_ce", "source_ce", "path", "explanation_ce"):
        assert float(metrics[term]) == 0.0, term


def test_infer_shapes_and_token_ranges(model, tiny_cfg):
    trainable, frozen, _ = model
    batch = random_batch(tiny_cfg, 3)
    m = tiny_cfg.model
    # One program for both samplers: they share the encoders and bridge (compiled once).
    both = jax.jit(lambda p, f, b: [F.infer(p, f, b, tiny_cfg, steps) for steps in (1, 3)])(trainable, frozen, batch)
    for actions, explanation in both:
        assert actions.shape == (3, m.action_len) and actions.dtype == jnp.int32
        assert explanation.shape == (3, m.explain_len) and explanation.dtype == jnp.int32
        assert int(actions.min()) >= 0 and int(actions.max()) < m.dnfm.vocab_size
        assert bool((explanation[:, 0] == m.text_bos_id).all())
    with pytest.raises(ValueError, match="1..8"):
        F.infer(trainable, frozen, batch, tiny_cfg, 9)


def test_uint8_frames_are_scaled_on_device_as_the_host_did(model, tiny_cfg):
    """Frames enter as uint8; `frame_features` gives bit for bit the ViT features of the float32
    frames in [0, 1] the host pipeline used to send (x / 255 in float32, then the compute dtype),
    and refuses float frames (they would be scaled twice or not at all)."""
    from vlacabin_jax.model.vla_cabin import VLACabin

    trainable, frozen, _ = model
    params = F.merge_params(trainable, frozen)
    module = F.build_model(tiny_cfg)
    frames = random_batch(tiny_cfg, 2)["frames"]
    got = jax.jit(lambda p, x: module.apply({"params": p}, x, method=VLACabin.frame_features))(params, frames)
    old = frames.astype(np.float32) * (1.0 / 255.0)  # the float32 frames of the old contract
    dtype = jnp.dtype(tiny_cfg.model.dtype)

    def old_path(p, x):
        pixels = x.reshape((-1,) + x.shape[2:]).astype(dtype) * 2.0 - 1.0
        return module.apply({"params": p}, pixels, method=lambda m, px: m.vit(px)).reshape(got.shape)

    assert np.array_equal(np.asarray(got), np.asarray(jax.jit(old_path)(params, old)))
    with pytest.raises(TypeError, match="uint8"):
        module.apply({"params": params}, old, method=VLACabin.frame_features)


def test_remat_model_initialises_and_infers_like_the_plain_one(model, tiny_cfg):
    """`model.remat` (base and a100x128 default to it) changes what the backward pass keeps, never
    the params or the answers. Init used to run `infer`, whose decode loops traced the
    rematerialised blocks' init inside `lax.fori_loop` and leaked a tracer (UnexpectedTracerError)."""
    trainable, frozen, _ = model
    cfg = ml_collections.ConfigDict(tiny_cfg.to_dict())
    cfg.model.remat, cfg.model.remat_policy = True, "dots"
    remat_trainable, remat_frozen = (nn.unbox(t) for t in F.init_params(cfg, jax.random.key(0)))
    same = jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), (trainable, frozen), (remat_trainable, remat_frozen))
    assert all(jax.tree_util.tree_leaves(same))
    batch = random_batch(tiny_cfg, 3)
    plain = jax.jit(lambda p, f, b: F.infer(p, f, b, tiny_cfg, 2))(trainable, frozen, batch)
    remat = jax.jit(lambda p, f, b: F.infer(p, f, b, cfg, 2))(remat_trainable, remat_frozen, batch)
    for a, b in zip(plain, remat):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
