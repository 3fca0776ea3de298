"""Parity of the frozen anchor (VisionTransformer, DecoderLM) with Hugging Face PyTorch models.

Tiny random HF models are built from configs (no downloads), every tensor randomised (biases and
norm scales too, so a layout slip cannot hide behind a zero or a one), saved as safetensors,
imported with `vlacabin_jax.hf_import`, and run in float32 against the eager PyTorch reference.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # required by the test extra: a broken install must fail here, not skip
import transformers

from vlacabin_jax import hf_import
from vlacabin_jax.model.lm import DecoderLM
from vlacabin_jax.model.vit import VisionTransformer

TOL = 1e-4

VIT_VARIANTS = {
    "siglip_w32_h4": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-6),
    "siglip_w48_h6": dict(hidden_size=48, num_attention_heads=6, intermediate_size=80, layer_norm_eps=1e-5),
}
LM_VARIANTS = {
    # Qwen2: GQA 4/2, q/k/v biases, tied embeddings, Qwen2's large RoPE base.
    "qwen2_gqa_tied": ("qwen2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=64, vocab_size=97, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Llama: MQA 4/1, head_dim decoupled from width (4 * 16 != 48), untied lm_head, eps 1e-5.
    "llama_mqa_untied": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                                       head_dim=16, intermediate_size=96, vocab_size=101,
                                       tie_word_embeddings=False, rms_norm_eps=1e-5)),
}


def randomize(model: "torch.nn.Module", seed: int) -> None:
    """Every parameter random: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 ± 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))


def make_siglip(path, seed: int = 0, **overrides):
    """A tiny random HF SiglipVisionModel (2 layers, patch 8, image 32) saved to `path`."""
    kw = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
              patch_size=8, image_size=32, attn_implementation="eager", torch_dtype=torch.float32)
    kw.update(overrides)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw)).eval()
    randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_lm(path, family: str, seed: int = 0, **overrides):
    """A tiny random HF Qwen2ForCausalLM / LlamaForCausalLM (2 layers) saved to `path`."""
    kw = dict(num_hidden_layers=2, attn_implementation="eager")
    kw.update(overrides)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    model = model.float().eval()
    randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(VIT_VARIANTS))
def siglip(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_siglip(path, seed=1, **VIT_VARIANTS[request.param])
    return request.param, path, model


@pytest.fixture(scope="module", params=sorted(LM_VARIANTS))
def decoder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    family, kw = LM_VARIANTS[request.param]
    model = make_lm(path, family, seed=2, **kw)
    return request.param, path, model


def max_err(ours, ref, where=None) -> float:
    diff = np.abs(np.asarray(ours, np.float32) - ref.detach().numpy())
    return float((diff if where is None else diff[where]).max())


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_vit_matches_hf(siglip, scan):
    name, path, model = siglip
    cfg = hf_import.vit_config_from_hf(path)
    params = hf_import.import_vit(path, cfg, scan=scan)
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
    ours = jax.jit(VisionTransformer(cfg, scan=scan).apply)({"params": params}, jnp.asarray(pixels))
    assert ours.shape == (2, 16, cfg["width"])
    err = max_err(ours, ref)
    print(f"\n[vit {name} scan={scan}] max abs err {err:.2e}")
    assert err <= TOL


def _lm_run(cfg, params, scan, tokens, mask):
    module = DecoderLM(cfg, scan=scan)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    @jax.jit
    def run(params, tokens, mask):
        variables = {"params": params}
        hidden = module.apply(variables, module.apply(variables, tokens, method=DecoderLM.embed), mask, positions)
        return hidden, module.apply(variables, hidden, method=DecoderLM.logits)

    return run(params, jnp.asarray(tokens), jnp.asarray(mask))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_lm_matches_hf(decoder, scan):
    name, path, model = decoder
    cfg = hf_import.lm_config_from_hf(path)
    params = hf_import.import_lm(path, cfg, scan=scan)
    tokens = np.random.default_rng(4).integers(0, cfg["vocab_size"], (2, 9))
    mask = np.ones_like(tokens, bool)
    with torch.no_grad():
        ids = torch.from_numpy(tokens)
        ref_hidden = model.model(input_ids=ids).last_hidden_state
        ref_logits = model(input_ids=ids).logits
    hidden, logits = _lm_run(cfg, params, scan, tokens, mask)
    errs = max_err(hidden, ref_hidden), max_err(logits, ref_logits)
    print(f"\n[lm {name} scan={scan}] max abs err hidden {errs[0]:.2e} logits {errs[1]:.2e}")
    assert max(errs) <= TOL


def test_lm_padded_batch_matches_hf(decoder):
    """Right padding: valid positions match HF with its attention_mask, and padding never leaks."""
    name, path, model = decoder
    cfg = hf_import.lm_config_from_hf(path)
    params = hf_import.import_lm(path, cfg, scan=True)
    tokens = np.random.default_rng(5).integers(0, cfg["vocab_size"], (2, 10))
    mask = np.ones_like(tokens, bool)
    mask[0, 6:] = False
    mask[1, 8:] = False
    with torch.no_grad():
        ids, am = torch.from_numpy(tokens), torch.from_numpy(mask.astype(np.int64))
        ref_hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state
        ref_logits = model(input_ids=ids, attention_mask=am).logits
    hidden, logits = _lm_run(cfg, params, True, tokens, mask)
    errs = max_err(hidden, ref_hidden, mask), max_err(logits, ref_logits, mask)
    print(f"\n[lm {name} padded] max abs err hidden {errs[0]:.2e} logits {errs[1]:.2e}")
    assert max(errs) <= TOL
    # Whatever sits in the padded slots must not change the valid outputs.
    other = np.where(mask, tokens, (tokens + 7) % cfg["vocab_size"])
    hidden2, _ = _lm_run(cfg, params, True, other, mask)
    assert np.abs(np.asarray(hidden2) - np.asarray(hidden))[mask].max() == 0.0
    assert np.isfinite(np.asarray(hidden)).all()


def _names(tree):
    boxes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) for b in boxes), "every param must carry logical axes"
    return {jax.tree_util.keystr(k): b.names for k, b in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_anchor_params_have_logical_axes(scan):
    from configs.vla_cabin import get_config

    c = get_config("tiny").model
    vit = VisionTransformer(c.vit, scan=scan)
    lm = DecoderLM(c.lm, scan=scan)
    tokens = jnp.zeros((1, 4), jnp.int32)
    vit_vars = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    lm_vars = jax.eval_shape(lambda: lm.init(jax.random.key(0), tokens, tokens >= 0, tokens,
                                             method=DecoderLM.forward_tokens))
    for tree in (vit_vars["params"], lm_vars["params"]):
        names = _names(tree)
        stacked = {k: v for k, v in names.items() if "'layers'" in k}
        assert (len(stacked) > 0) == scan
        assert all(v[0] == "layers" for v in stacked.values())
    assert _names(lm_vars["params"])["['embedding']"] == ("vocab", "embed")
    # embed + __call__ alone (as the parent model uses the LM) builds the same tree.
    plain = jax.eval_shape(lambda: lm.init(jax.random.key(0), jnp.zeros((1, 4, c.lm.width)), tokens >= 0, tokens))
    assert jax.tree.structure(plain) == jax.tree.structure(lm_vars)


def test_anchor_bf16_and_remat(tmp_path):
    """bf16 compute/storage stays close to fp32; remat and gradients through the stack work."""
    make_lm(tmp_path, "qwen2", seed=6, **LM_VARIANTS["qwen2_gqa_tied"][1])
    cfg = hf_import.lm_config_from_hf(tmp_path)
    params = hf_import.import_lm(tmp_path, cfg, scan=True)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg["vocab_size"], (2, 6)))
    mask, pos = tokens >= 0, jnp.broadcast_to(jnp.arange(6), (2, 6))
    f32 = jax.jit(DecoderLM(cfg).apply, static_argnames="method")(
        {"params": params}, tokens, mask, pos, method=DecoderLM.forward_tokens)
    bf16_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    bf16 = jax.jit(DecoderLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply, static_argnames="method")(
        {"params": bf16_params}, tokens, mask, pos, method=DecoderLM.forward_tokens)
    assert bf16.dtype == jnp.bfloat16
    assert float(jnp.abs(bf16.astype(jnp.float32) - f32).max()) < 0.1 * float(jnp.abs(f32).max())

    def loss(emb, remat):
        return DecoderLM(cfg, remat=remat).apply({"params": params}, emb, mask, pos).sum()

    emb = jnp.asarray(params["embedding"])[tokens]
    grads = {remat: jax.jit(jax.grad(loss), static_argnums=1)(emb, remat) for remat in (False, True, "dots")}
    assert grads[False].shape == emb.shape and bool(jnp.isfinite(grads[False]).all())
    for remat in (True, "dots"):  # a remat policy changes what is recomputed, not the gradient
        np.testing.assert_allclose(grads[remat], grads[False], rtol=1e-4, atol=1e-5, err_msg=str(remat))
