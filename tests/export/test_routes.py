"""The mirror follows every route the config can switch, and its action decode is JAX's.

Parity (JAX vs the PyTorch mirror, float32, on random-init params with noise so no kernel is zero
and the DNFM moves) for: the tiny defaults (every route on), tiny with every route off (what
small / base / a100x128 run, on tiny's sizes), a mixed set, and an anchor that trains
(`train.trainable = "all_and_anchor"`: the anchor comes from the trainable tree). The inputs are the
random edge cases of `verify.random_batch` plus synthetic-world turns, follow-ups with a non-empty
action log among them; the action log must also change the outputs (the route is live).

The constrained decode (`dnfm.decode_tokens`) is compared id for id on random and adversarial
logits, and its ONNX graph is checked to be loop-free and free of boolean indexing.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
import torch

from tests.export.conftest import trained_checkpoint, variant_config
from vlacabin_jax.data import actions
from vlacabin_jax.data.actions import ActionVocabulary
from vlacabin_jax.export import convert, source, torch_model, verify
from vlacabin_jax.model import dnfm, functional, vla_cabin

ROUTES_OFF = {"model.state.field_tokens": False, "model.state.numeric_fourier": 0, "model.video.patch_tokens": False,
              "model.bridge.connector_skip": False, "model.dnfm.cross_attention": False}
CASES = {
    "tiny_defaults": {},
    "routes_off": ROUTES_OFF,
    # Fourier features without field tokens (pooled state), per-frame video, the skip and the
    # cross-attention reading the query positions only, and the plain argmax decode.
    "mixed": {"model.state.field_tokens": False, "model.state.numeric_fourier": 2, "model.video.patch_tokens": False,
              "model.bridge.connector_reads": "queries", "model.dnfm.constrained_decode": False},
    "anchor_trains": {"train.trainable": "all_and_anchor"},
}


def config(overrides: dict):
    return variant_config("tiny", overrides)


def noised_params(cfg, seed: int = 0):
    """Random-init params (`source.from_random_init`) + N(0, 0.02²) on every trainable leaf: the
    DNFM's zero-initialised output and modulation kernels would otherwise make the sampler idle."""
    src = source.from_random_init(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    trainable = jax.tree.map(lambda x: (x + 0.02 * rng.normal(size=x.shape)).astype(x.dtype), src.trainable)
    return trainable, src.frozen


def load_mirror(cfg, trainable, frozen, steps: int):
    config_json = convert.mirror_config(cfg, steps)
    state = convert.flax_to_torch(trainable, frozen, config_json)
    mirror = torch_model.VLACabinMirror(config_json)
    torch_model.load_strict(mirror, {k: torch.from_numpy(v) for k, v in state.items()})
    return mirror.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_mirror_matches_jax_on_every_route(case, tmp_path_factory):
    if case == "anchor_trains":
        # Through a checkpoint in the trainer's format (fresh params + noise, `train_and_save`):
        # the anchor trains, so it is restored from the trainable tree and `frozen` is empty.
        src = source.from_checkpoint(trained_checkpoint(tmp_path_factory, "tiny", steps=0, overrides=CASES[case],
                                                        name="anchor-trains"))
        cfg, trainable, frozen = src.cfg, src.trainable, src.frozen
        assert cfg.train.trainable == "all_and_anchor" and {"vit", "lm"} <= set(trainable) and frozen == {}
    else:
        cfg = config(CASES[case])
        trainable, frozen = noised_params(cfg)
    steps = 2
    mirror = load_mirror(cfg, trainable, frozen, steps)
    inputs = verify.verification_inputs(cfg, 4, 4)
    first = inputs["history_actions"][:, 0]
    executed, logged = first > actions.NOOP_ID, first != actions.PAD_ID
    assert executed[4:].any() and executed[:4].any(), "a world follow-up and a random row with an executed log"
    assert (first == actions.NOOP_ID).any() and not logged.all()
    reference = verify.JaxReference(cfg, trainable, frozen, steps)
    ref = reference(inputs)
    got = verify.run_torch(mirror, inputs)
    result = verify.compare(ref, got, verify.FP32)
    assert result["pass"], result["outputs"]
    assert np.array_equal(ref["decoded_actions"], ref["action_tokens"])  # the reference agrees with itself
    assert result["outputs"]["velocities"]["max_ref"] > 1e-3  # the sampler moves
    # The action log is read: clearing it changes z0, in JAX and in the mirror alike.
    cleared = dict(inputs, history_actions=np.zeros_like(inputs["history_actions"]),
                   history_before=np.zeros_like(inputs["history_before"]))
    ref_cleared, got_cleared = reference(cleared), verify.run_torch(mirror, cleared)
    assert verify.compare(ref_cleared, got_cleared, verify.FP32)["pass"]
    moved = np.abs(ref_cleared["z0"] - ref["z0"]).max(axis=(1, 2))
    assert (moved[logged] > 1e-4).all() and (moved[~logged] <= 1e-6).all(), moved
    if cfg.model.dnfm.constrained_decode:
        vocab = ActionVocabulary()
        for row in got["action_tokens"]:
            vocab.decode(row)  # every decoded sequence is well formed


def test_latent_layout_is_the_models():
    for overrides in CASES.values():
        m = config(overrides).model
        assert torch_model.latent_counts(m) == vla_cabin.latent_counts(m)
        assert torch_model.latent_layout(m) == vla_cabin.latent_layout(m)
    assert (torch_model.PAD_ID, torch_model.EOS_ID, torch_model.NOOP_ID) == (actions.PAD_ID, actions.EOS_ID,
                                                                             actions.NOOP_ID)


def test_conversion_is_strict_on_every_route():
    """Each route's params exist exactly when the route is on; a tree of the other setting is refused."""
    trees = {}
    for name in ("tiny_defaults", "routes_off"):
        cfg = config(CASES[name])
        t, f = jax.eval_shape(lambda: functional.init_params(cfg, jax.random.key(0)))
        trees[name] = cfg, jax.tree.map(lambda x: np.zeros(x.shape, np.float32), (nn.unbox(t), nn.unbox(f)))
    on_cfg, (on_t, on_f) = trees["tiny_defaults"]
    off_cfg, (off_t, off_f) = trees["routes_off"]
    on = convert.flax_to_torch(on_t, on_f, convert.mirror_config(on_cfg, 2))
    off = convert.flax_to_torch(off_t, off_f, convert.mirror_config(off_cfg, 2))
    routes = (r"video_encoder\.patch_position_embedding", r"video_encoder\.pool\..+", r"connector\.skip_proj\.weight",
              r"dnfm\.blocks\.layers\.\d+\.(ln_cross|cross_attn)\..+")
    only_on = set(on) - set(off)
    assert all(any(re.fullmatch(r, k) for r in routes) for k in only_on), sorted(only_on)
    assert all(any(re.fullmatch(r, k) for k in only_on) for r in routes)
    assert len([k for k in only_on if ".cross_attn." in k]) == 8 * on_cfg.model.dnfm.depth  # q, k, v, out
    assert set(off) - set(on) == {k for k in off if k.startswith("state_encoder.pool.")} != set()
    n_num = on_cfg.model.state.numeric_dim  # numeric_scale [n_num, 1 + 2F, width], even with F = 0
    assert on["state_encoder.numeric_scale"].shape == (n_num, 1 + 2 * 6, 64)
    assert off["state_encoder.numeric_scale"].shape == (n_num, 1, 64)
    with pytest.raises(convert.ConversionError, match="no place in the mirror"):
        convert.flax_to_torch(on_t, on_f, convert.mirror_config(off_cfg, 2))
    with pytest.raises(convert.ConversionError, match="missing Flax param"):
        convert.flax_to_torch(off_t, off_f, convert.mirror_config(on_cfg, 2))


def test_autoregressive_head_is_refused_in_one_line():
    cfg = config({"model.action_head": "autoregressive"})
    with pytest.raises(source.ExportInputError, match=r"^model\.action_head = 'autoregressive' is not exported") as e:
        source.from_random_init(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"model\.action_head = 'autoregressive'"):
        torch_model.check_config(convert.mirror_config(cfg, 2))
    with pytest.raises(convert.ConversionError, match=r"model\.action_head = 'autoregressive'"):
        convert.flax_to_torch({}, {}, convert.mirror_config(cfg, 2))


# ------------------------------------------------------------------------------ constrained decode


def adversarial_logits(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Random logits with rows built to press on every grammar rule."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    pad, eos, noop = actions.PAD_ID, actions.EOS_ID, actions.NOOP_ID
    x[0, :, noop] += 50.0  # <noop> favoured everywhere: <noop>, <eos>, <pad>...
    x[1, :, eos] += 50.0  # <eos> favoured everywhere, at position 0 too (forbidden there)
    x[2, :, [pad, eos]] -= 50.0  # nothing wants to end: <eos> forced at the last position
    x[2, :, noop] -= 50.0
    x[3, :, pad] += 50.0  # <pad> favoured everywhere (never allowed before <eos>)
    x[4, 0, noop] += 50.0  # <noop> first, then device tokens favoured: <eos> is forced next
    x[4, 1:, 3:] += 50.0
    x[5, 0, 3:] += 50.0  # a device token first, then <noop> favoured (forbidden after 0)
    x[5, 1:, noop] += 50.0
    x[6, length // 2, eos] += 50.0  # an <eos> in the middle, then device tokens favoured: only <pad> after
    x[6, length // 2 + 1:, 3:] += 50.0
    x[7] = 0.0  # all ties: the first allowed id wins, in JAX and in torch
    x[8, :, :] = -1e30  # huge negative logits stay above the forbidden value
    x[8, :, 7] = -1e29
    return x


@pytest.mark.parametrize("length", [1, 2, 8])
def test_constrained_decode_matches_jax(length):
    vocab = 181
    logits = np.concatenate([adversarial_logits(9, length, vocab),
                             np.random.default_rng(1).normal(size=(64, length, vocab)).astype(np.float32) * 3.0])
    words = ActionVocabulary()
    for constrained in (True, False):
        want = np.asarray(jax.jit(lambda x: dnfm.decode_tokens(x, constrained))(jnp.asarray(logits)))
        got = torch_model.decode_tokens(torch.from_numpy(logits), constrained, length, vocab).numpy()
        assert got.dtype == np.int32 and np.array_equal(got, want), (constrained, np.argwhere(got != want)[:5])
        if constrained and length > 1:
            for row in got:
                words.decode(row)  # well formed: <noop> alone or device tokens, one <eos>, <pad> after
    if length >= 2:
        got = torch_model.decode_tokens(torch.from_numpy(logits), True, length, vocab).numpy()
        assert list(got[0, :2]) == [actions.NOOP_ID, actions.EOS_ID]
        assert got[1, 0] not in (actions.EOS_ID, actions.PAD_ID) and got[1, 1] == actions.EOS_ID
        assert got[2, -1] == actions.EOS_ID and (got[2, :-1] > actions.NOOP_ID).all()
        assert actions.PAD_ID not in got[3, :list(got[3]).index(actions.EOS_ID)]


class _Decode(torch.nn.Module):
    def forward(self, logits):
        return torch_model.decode_tokens(logits, True, 8, 181)


def test_constrained_decode_onnx_is_straight_line(tmp_path):
    """Unrolled: no Loop/If/Scan, and no boolean indexing (NonZero, Compress) in the graph; ONNX
    Runtime gives the same ids at another batch size."""
    from vlacabin_jax.export.onnx_export import ort_session

    logits = adversarial_logits(9, 8, 181)
    path = tmp_path / "decode.onnx"
    torch.onnx.export(_Decode(), (torch.from_numpy(logits[:2]),), str(path), dynamo=False, opset_version=18,
                      input_names=["logits"], output_names=["ids"], dynamic_axes={"logits": {0: "b"}, "ids": {0: "b"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "If", "Scan", "NonZero", "Compress", "SequenceMap"}, ops
    got = ort_session(path).run(None, {"logits": logits})[0]
    want = np.asarray(dnfm.decode_tokens(jnp.asarray(logits), True))
    assert np.array_equal(got, want)
