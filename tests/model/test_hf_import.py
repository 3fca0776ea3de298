"""`vlacabin_jax.hf_import` and `tools.import_hf`: configs, strictness, layouts, round trips.

Numerical parity of the imported modules is in test_anchor.py; here the checkpoints are tiny
random HF models built from configs (no downloads) and edited on disk to provoke each error.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
# torch and transformers are required (the `test` extra): a broken install fails here, it does
# not skip the parity tests.
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tools import import_hf as cli
from vlacabin_jax import hf_import
from vlacabin_jax.hf_import import HFImportError
from vlacabin_jax.model.vit import VisionTransformer

SIGLIP = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
              patch_size=8, image_size=32, attn_implementation="eager")
QWEN2 = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=97, num_hidden_layers=2, tie_word_embeddings=True, attn_implementation="eager")
LLAMA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64,
             vocab_size=101, num_hidden_layers=2, tie_word_embeddings=False, attn_implementation="eager")


def _randomize(model, seed: int):
    """Every tensor random (biases and norm scales too), so a swapped or dropped one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]) if p.ndim > 1 else 10))
    return model.float().eval()


def _save(model, path, seed: int, **kw):
    _randomize(model, seed).save_pretrained(path, safe_serialization=True, **kw)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Paths (and the torch models) of the tiny checkpoints shared by the tests."""
    root = tmp_path_factory.mktemp("hf")
    t = transformers
    out = {}
    out["siglip"] = root / "siglip", _save(t.SiglipVisionModel(t.SiglipVisionConfig(**SIGLIP)), root / "siglip", 0)
    full = t.SiglipModel(t.SiglipConfig(
        vision_config={k: v for k, v in SIGLIP.items() if k != "attn_implementation"},
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        attn_implementation="eager"))
    out["siglip_full"] = root / "siglip_full", _save(full, root / "siglip_full", 1)
    out["qwen2"] = root / "qwen2", _save(t.Qwen2ForCausalLM(t.Qwen2Config(**QWEN2)), root / "qwen2", 2)
    out["llama"] = root / "llama", _save(t.LlamaForCausalLM(t.LlamaConfig(**LLAMA)), root / "llama", 3)
    out["llama_sharded"] = root / "llama_sharded", out["llama"][1]
    out["llama"][1].save_pretrained(root / "llama_sharded", safe_serialization=True, max_shard_size="20KB")
    return out


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy checkpoint `src` to `dst` (one safetensors file), editing the tensors and/or config."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


# ------------------------------------------------------------------------------------ configs


def test_configs_from_hf(ckpt, tmp_path):
    vit = hf_import.vit_config_from_hf(ckpt["siglip"][0])
    assert vit == dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64, layernorm_eps=1e-6)
    assert hf_import.vit_config_from_hf(ckpt["siglip_full"][0]) == vit
    qwen = hf_import.lm_config_from_hf(ckpt["qwen2"][0])
    assert qwen == dict(vocab_size=97, width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
                        rope_theta=10000.0, rms_eps=1e-6, qkv_bias=True, tie_embeddings=True)
    llama = hf_import.lm_config_from_hf(ckpt["llama"][0])
    assert (llama["kv_heads"], llama["qkv_bias"], llama["tie_embeddings"]) == (1, False, False)

    # transformers 4.x style: top-level rope_theta, rope_scaling null.
    def old_style(c):
        c.pop("rope_parameters")
        c.update(rope_theta=1e6, rope_scaling=None)

    old = _rewrite(ckpt["qwen2"][0], tmp_path / "old", edit_config=old_style)
    assert hf_import.lm_config_from_hf(old)["rope_theta"] == 1e6


@pytest.mark.parametrize("kind, edit, match", [
    ("lm", lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "RoPE scaling 'linear'"),
    ("lm", lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE scaling 'dynamic'"),
    ("lm", lambda c: c.update(use_sliding_window=True, sliding_window=4), "sliding-window"),
    ("lm", lambda c: c.update(model_type="llama", attention_bias=True, architectures=["LlamaForCausalLM"]),
     "attention_bias"),
    ("lm", lambda c: c.update(model_type="mistral"), "model_type 'mistral' is not supported"),
    ("lm", lambda c: c.update(architectures=["Qwen2ForSequenceClassification"]), "architecture"),
    ("lm", lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    ("vit", lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("vit", lambda c: c.update(model_type="clip_vision_model"), "model_type 'clip_vision_model'"),
])
def test_unsupported_configs_are_refused(ckpt, tmp_path, kind, edit, match):
    src = ckpt["qwen2" if kind == "lm" else "siglip"][0]
    bad = _rewrite(src, tmp_path / "bad", edit_config=edit)
    with pytest.raises(HFImportError, match=match):
        (hf_import.import_lm if kind == "lm" else hf_import.import_vit)(bad, None, scan=True)


def test_bad_paths(tmp_path):
    with pytest.raises(HFImportError, match="not a directory"):
        hf_import.lm_config_from_hf(tmp_path / "nope")
    with pytest.raises(HFImportError, match="no config.json"):
        hf_import.vit_config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(HFImportError, match="no \\*.safetensors"):
        hf_import.import_lm(tmp_path, None, scan=True)


def test_config_mismatch_is_refused(ckpt):
    cfg = dict(hf_import.lm_config_from_hf(ckpt["qwen2"][0]), rms_eps=1e-5)
    with pytest.raises(HFImportError, match="rms_eps: config 1e-05 vs checkpoint 1e-06"):
        hf_import.import_lm(ckpt["qwen2"][0], cfg, scan=True)


# ------------------------------------------------------------------------------- strictness


def test_missing_unknown_and_misshapen_tensors_are_named(ckpt, tmp_path):
    src = ckpt["llama"][0]

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    def extra(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)

    def misshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)

    cases = [(drop, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
             (extra, r"unexpected tensors: model\.layers\.0\.self_attn\.q_norm\.weight"),
             (misshape, r"wrong shapes: model\.layers\.0\.self_attn\.k_proj\.weight \[16, 32\] \(expected \[8, 32\]\)")]
    for i, (edit, match) in enumerate(cases):
        bad = _rewrite(src, tmp_path / f"bad{i}", edit_tensors=edit)
        for scan in (True, False):
            with pytest.raises(HFImportError, match=match):
                hf_import.import_lm(bad, None, scan=scan)
    # Several problems: one error naming all of them.
    both = _rewrite(src, tmp_path / "both", edit_tensors=lambda t: (drop(t), extra(t)))
    with pytest.raises(HFImportError, match="missing tensors: .*; unexpected tensors: "):
        hf_import.import_lm(both, None, scan=True)
    # The ViT too, and an untied LM whose head is gone.
    vit = _rewrite(ckpt["siglip"][0], tmp_path / "vit", edit_tensors=lambda t: t.pop("post_layernorm.bias"))
    with pytest.raises(HFImportError, match=r"missing tensors: post_layernorm\.bias"):
        hf_import.import_vit(vit, None, scan=True)
    headless = _rewrite(src, tmp_path / "headless", edit_tensors=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(HFImportError, match=r"missing tensors: lm_head\.weight"):
        hf_import.import_lm(headless, None, scan=False)


def test_tied_checkpoint_with_stored_head(ckpt, tmp_path):
    src = ckpt["qwen2"][0]
    same = _rewrite(src, tmp_path / "same", edit_tensors=lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    result = hf_import.convert_checkpoint(same, "lm", None, scan=True)
    assert "lm_head.weight" in result.ignored and "lm_head" not in result.params
    differs = _rewrite(src, tmp_path / "differs", edit_tensors=lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(HFImportError, match="lm_head.weight differs"):
        hf_import.import_lm(differs, None, scan=True)


def test_ignored_tensors_are_listed(ckpt):
    vit = hf_import.convert_checkpoint(ckpt["siglip"][0], "vit", None)
    assert vit.ignored and all(k.startswith("head.") for k in vit.ignored)
    assert "head.probe" in vit.ignored
    full = hf_import.convert_checkpoint(ckpt["siglip_full"][0], "vit", None)
    assert {"logit_scale", "logit_bias", "vision_model.head.probe"} <= set(full.ignored)
    assert any(k.startswith("text_model.") for k in full.ignored)


# ------------------------------------------------------------------ layouts and round trips


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_round_trip_is_exact(ckpt, scan):
    """HF -> Flax -> HF reproduces every consumed tensor bit for bit, and loads strictly into torch."""
    t = transformers
    for name in ("siglip", "qwen2", "llama"):
        path, model = ckpt[name]
        original = load_file(path / "model.safetensors")
        if name == "siglip":
            cfg = hf_import.vit_config_from_hf(path)
            exported = hf_import.export_vit_to_hf(hf_import.import_vit(path, cfg, scan), cfg)
            original = {k: v for k, v in original.items() if not k.startswith("head.")}
            fresh = t.SiglipVisionModel(t.SiglipVisionConfig(**SIGLIP, vision_use_head=False))
        else:
            cfg = hf_import.lm_config_from_hf(path)
            params = hf_import.import_lm(path, cfg, scan)
            exported = hf_import.export_lm_to_hf(params, cfg)
            fresh = type(model)(model.config)
        assert exported.keys() == original.keys(), name
        for k in original:
            assert exported[k].dtype == original[k].dtype and np.array_equal(exported[k], original[k]), (name, k)
        if name == "qwen2":  # tied: a strict torch load wants lm_head.weight too
            exported = hf_import.export_lm_to_hf(params, cfg, tied_head=True)
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_layouts_follow_design(ckpt):
    """DESIGN §7: kernel [in, out] = weight.T; q/k/v [embed, heads, hd]; out [heads, hd, embed]; OIHW -> HWIO."""
    path = ckpt["llama"][0]
    hf = load_file(path / "model.safetensors")
    p = hf_import.import_lm(path, None, scan=False)["decoder"]["layers_1"]
    q = hf["model.layers.1.self_attn.q_proj.weight"]  # [heads * hd, embed]
    np.testing.assert_array_equal(p["attn"]["query"]["dense"]["kernel"], q.T.reshape(32, 4, 8))
    np.testing.assert_array_equal(p["attn"]["key"]["dense"]["kernel"][:, 0, :],
                                  hf["model.layers.1.self_attn.k_proj.weight"].T)
    o = hf["model.layers.1.self_attn.o_proj.weight"]  # [embed, heads * hd]
    np.testing.assert_array_equal(p["attn"]["out"]["dense"]["kernel"][2], o[:, 16:24].T)
    np.testing.assert_array_equal(p["mlp"]["down"]["dense"]["kernel"], hf["model.layers.1.mlp.down_proj.weight"].T)
    vpath = ckpt["siglip"][0]
    conv = load_file(vpath / "model.safetensors")["embeddings.patch_embedding.weight"]  # OIHW
    kernel = hf_import.import_vit(vpath, None, scan=True)["patch_embed"]["kernel"]  # HWIO
    assert kernel[1, 2, 0, 5] == conv[5, 0, 1, 2]


def test_sharded_and_prefixed_checkpoints(ckpt, tmp_path):
    sharded = ckpt["llama_sharded"][0]
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    _assert_same(hf_import.import_lm(sharded, None, True), hf_import.import_lm(ckpt["llama"][0], None, True))

    # transformers 4.x SiglipVisionModel files prefix the tower with "vision_model.".
    def prefix(t):
        for k in list(t):
            t["vision_model." + k] = t.pop(k)

    old = _rewrite(ckpt["siglip"][0], tmp_path / "old_siglip", edit_tensors=prefix)
    _assert_same(hf_import.import_vit(old, None, False), hf_import.import_vit(ckpt["siglip"][0], None, False))

    # A bare Qwen2Model (no "model." prefix, no head).
    def bare(t):
        for k in list(t):
            t[k.removeprefix("model.")] = t.pop(k)

    base = _rewrite(ckpt["qwen2"][0], tmp_path / "bare", edit_tensors=bare,
                    edit_config=lambda c: c.update(architectures=["Qwen2Model"]))
    _assert_same(hf_import.import_lm(base, None, True), hf_import.import_lm(ckpt["qwen2"][0], None, True))


def test_full_siglip_matches_its_vision_tower(ckpt):
    path, model = ckpt["siglip_full"]
    cfg = hf_import.vit_config_from_hf(path)
    params = hf_import.import_vit(path, cfg, scan=True)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
    ours = jax.jit(VisionTransformer(cfg).apply)({"params": params}, jnp.asarray(pixels))
    assert float(np.abs(np.asarray(ours) - ref.numpy()).max()) <= 1e-4
    exported = hf_import.export_vit_to_hf(params, cfg, prefix="vision_model.")
    original = load_file(path / "model.safetensors")
    assert all(np.array_equal(v, original[k]) for k, v in exported.items())


def test_dtype_cast(ckpt):
    import ml_dtypes

    params = hf_import.import_lm(ckpt["qwen2"][0], None, scan=True, dtype=ml_dtypes.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


# ----------------------------------------------------------------------------------------- CLI


def test_cli_writes_flat_safetensors(ckpt, tmp_path, capsys):
    out = tmp_path / "anchor.safetensors"
    assert cli.main(["--vit", str(ckpt["siglip"][0]), "--lm", str(ckpt["llama"][0]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vit:" in printed and "lm:" in printed and "params:" in printed and '"kv_heads": 1' in printed
    flat = load_file(out)
    assert flat["lm/decoder/layers/attn/query/dense/kernel"].shape == (2, 32, 4, 8)
    assert flat["vit/patch_embed/kernel"].shape == (8, 8, 3, 32)
    assert flat["lm/lm_head"].shape == (32, 101)
    with safe_open(str(out), "numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["lm_config"])["vocab_size"] == 101 and json.loads(meta["scan"]) is True

    out2 = tmp_path / "unrolled.safetensors"
    assert cli.main(["--lm", str(ckpt["qwen2"][0]), "--out", str(out2), "--no-scan", "--dtype", "bfloat16"]) == 0
    flat = load_file(out2)
    assert "lm/decoder/layers_1/attn/query/dense/bias" in flat and "lm/lm_head" not in flat
    assert str(flat["lm/embedding"].dtype) == "bfloat16"


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    assert cli.main(["--lm", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    bad = _rewrite(ckpt["qwen2"][0], tmp_path / "sliding", edit_config=lambda c: c.update(use_sliding_window=True))
    assert cli.main(["--lm", str(bad), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "sliding-window" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_anchor_file_loads_into_the_frozen_tree(ckpt, tmp_path):
    """`model.anchor_weights`: the CLI's file fills the model's own anchor tree exactly, cast to
    the run's anchor dtype; a file for another layout or size is refused by name."""
    out = tmp_path / "anchor.safetensors"
    assert cli.main(["--vit", str(ckpt["siglip"][0]), "--lm", str(ckpt["llama"][0]), "--out", str(out)]) == 0
    vit_cfg = hf_import.vit_config_from_hf(ckpt["siglip"][0])
    lm_cfg = hf_import.lm_config_from_hf(ckpt["llama"][0])
    to_bf16 = lambda t: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), t)  # noqa: E731
    frozen = {"vit": to_bf16(hf_import._abstract_params("vit", vit_cfg, True)),
              "lm": to_bf16(hf_import._abstract_params("lm", lm_cfg, True))}
    anchor, groups = hf_import.load_anchor_file(out, frozen)
    assert groups == ["vit", "lm"]
    want = {"vit": hf_import.import_vit(ckpt["siglip"][0], None, True),
            "lm": hf_import.import_lm(ckpt["llama"][0], None, True)}
    for (path, got), (_, ref) in zip(jax.tree_util.tree_leaves_with_path(anchor),
                                     jax.tree_util.tree_leaves_with_path(want)):
        assert got.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32))

    # Only an LM in the file: the ViT stays as given.
    lm_only = tmp_path / "lm.safetensors"
    assert cli.main(["--lm", str(ckpt["llama"][0]), "--out", str(lm_only)]) == 0
    anchor, groups = hf_import.load_anchor_file(lm_only, frozen)
    assert groups == ["lm"] and anchor["vit"] is frozen["vit"]

    unrolled = {"vit": frozen["vit"], "lm": to_bf16(hf_import._abstract_params("lm", lm_cfg, False))}
    with pytest.raises(HFImportError, match=r"lm params do not fit .*model.scan_layers"):
        hf_import.load_anchor_file(out, unrolled)
    with pytest.raises(HFImportError, match="no such file.*tools.import_hf"):
        hf_import.load_anchor_file(tmp_path / "nope.safetensors", frozen)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(HFImportError, match="not a readable safetensors file"):
        hf_import.load_anchor_file(tmp_path / "junk.safetensors", frozen)
