"""The export folds LoRA adapters into the encoder kernels: the mirror gets `W + alpha / rank · A B`
and no adapter tensors. Random values on the config's shapes (traced, never compiled); the
numerical equivalence of merged and unmerged params in JAX is `tests/model/test_lora.py`."""
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
