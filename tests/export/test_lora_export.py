"""The export folds LoRA adapters into the encoder kernels: the mirror gets `W + alpha / rank · A B`
and no adapter tensors. Random values on the config's shapes (traced, never compiled); the
numerical equivalence of merged and unmerged params in JAX is `tests/model/test_lora.py`; a
checkpoint with adapters exported and run against JAX: the last test."""
import dataclasses

import numpy as np
import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.export import convert, source
from vlacabin_jax.model import functional as F
from vlacabin_jax.model import lora


def _cfg(rank: int, trainable: str):
    cfg = get_config("tiny")
    cfg.model.lora.update(rank=rank, alpha=8.0, targets=",".join(lora.TARGETS))
    cfg.train.trainable = trainable
    return cfg


def _random(tree, rng):
    return {k: _random(v, rng) if isinstance(v, dict) else (0.1 * rng.normal(size=v.shape)).astype(v.dtype)
            for k, v in tree.items()}


def test_conversion_merges_adapters_into_the_kernels():
    cfg, plain = _cfg(4, "lora_and_heads"), _cfg(0, "all")
    rng = np.random.default_rng(0)
    trainable, frozen = (_random(t, rng) for t in source.abstract_params(cfg))
    adapted = convert.flax_to_torch(trainable, frozen, convert.mirror_config(cfg, 4))

    merged = F.merge_lora(F.merge_params(trainable, frozen), cfg)
    want = convert.flax_to_torch(*F.split_params(merged, plain), convert.mirror_config(plain, 4))
    assert set(adapted) == set(want) and not any("lora" in name for name in adapted)
    for name in want:
        np.testing.assert_allclose(adapted[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # One kernel by hand: a per-head query projection of a scanned stack, [D, H, hd] + A [D, r] B [r, H, hd].
    q = F.merge_params(trainable, frozen)["text_encoder"]["encoder"]["layers"]["attn"]["query"]
    kernel = q["dense"]["kernel"][0] + 2.0 * np.einsum("dr,rhk->dhk", q["lora_a"][0], q["lora_b"][0])
    got = adapted["text_encoder.encoder.layers.0.attn.query.weight"]
    np.testing.assert_allclose(got, kernel.reshape(kernel.shape[0], -1).T, rtol=1e-5, atol=1e-6)
    assert np.abs(got - q["dense"]["kernel"][0].reshape(kernel.shape[0], -1).T).max() > 1e-3

    # A config without adapters does not silently drop them.
    with pytest.raises(convert.ConversionError, match="lora_a"):
        convert.flax_to_torch(trainable, frozen, convert.mirror_config(plain, 4))


def test_lora_checkpoint_exports_a_mirror_that_matches_jax(tmp_path_factory):
    """A tiny checkpoint in the trainer's format with LoRA adapters on the encoders (the align
    stage's layout; every param noised, see `train_and_save`, so each adapter changes its kernel):
    the PyTorch mirror, with the adapters folded in, gives JAX's outputs with the adapters
    applied on the fly."""
    from tests.export.conftest import trained_checkpoint
    from vlacabin_jax.export import torch_model, verify
    from vlacabin_jax.export.bundle import find_tokenizer_dir, write_pytorch
    from vlacabin_jax.export.source import from_checkpoint

    overrides = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "train.trainable": "lora_and_heads"}
    src = from_checkpoint(trained_checkpoint(tmp_path_factory, "tiny", steps=0, overrides=overrides, name="lora"))
    assert src.cfg.model.lora.rank == 4
    assert sum(k.endswith("lora_b") for k, _ in _flat(src.trainable)) >= 4
    # The noised adapters (0.02) made 25x louder, so that folding them in or not is far beyond
    # the fp32 tolerance of the comparison.
    src = dataclasses.replace(src, trainable=_map(
        lambda k, v: v * 25.0 if k.endswith("lora_b") else v, src.trainable))
    out = tmp_path_factory.mktemp("lora")
    write_pytorch(out, src, 2, find_tokenizer_dir(src.cfg, None))
    mirror = torch_model.load_mirror(out)
    inputs = verify.verification_inputs(src.cfg, 2, 2)  # 2 random edge cases + 2 world samples
    reference = verify.JaxReference(src.cfg, src.trainable, src.frozen, steps=2)(inputs)
    result = verify.compare(reference, verify.run_torch(mirror, inputs), verify.FP32)
    assert result["pass"], result
    assert all(result["outputs"][k]["agreement"] == 1.0 for k in verify.TOKEN_OUTPUTS)
    assert result["outputs"]["velocities"]["max_ref"] > 1e-2


def _map(fn, tree, prefix=""):
    """`tree` with each leaf replaced by fn(path "a/b/c", leaf)."""
    return {k: _map(fn, v, f"{prefix}{k}/") if isinstance(v, dict) else fn(f"{prefix}{k}", v)
            for k, v in tree.items()}


def _flat(tree, prefix=""):
    """[(path "a/b/c", leaf)] of a nested dict."""
    out = []
    for k, v in tree.items():
        out += _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else [(f"{prefix}{k}", np.asarray(v))]
    return out
