"""Load Hugging Face SigLIP-vision and Qwen2/Llama checkpoints into the anchor's Flax params.

Reads a local checkpoint directory (config.json + *.safetensors, sharded or not) with
`safetensors.numpy`; no torch needed. The mapping is an explicit table of `KeyRule`s (HF name,
Flax path, layout), so the same table exports Flax params back to HF names (`export_*_to_hf`).

Strict: every Flax param must be filled with the right shape and every HF tensor consumed or
explicitly ignored (SigLIP pooling head, SigLIP text tower, rotary `inv_freq`), else one
`HFImportError` names the offending keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from vlacabin_jax.model.lm import DecoderLM
from vlacabin_jax.model.vit import VisionTransformer, as_config

log = logging.getLogger(__name__)

Params = dict[str, Any]


class HFImportError(ValueError):
    """A checkpoint that cannot be imported: bad path, unsupported architecture, key mismatch."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One HF tensor <-> one Flax param.

    Attributes:
      hf: canonical HF name (SigLIP: relative to the vision tower, e.g.
        "encoder.layers.0.mlp.fc1.weight"; LM: as in `*ForCausalLM`, e.g. "model.norm.weight").
      flax: Flax param path in the unscanned layout ("layers_{i}" for block i).
      layout: "linear" (torch [out, in] <-> Flax kernel [in..., out...]), "reshape" (same data,
        e.g. bias [H*hd] <-> [H, hd]) or "conv" (torch OIHW <-> Flax HWIO).
      hf_shape, flax_shape: shapes on each side (flax_shape per block, without the scan axis).
      layer: block index for per-block params, else None.
    """

    hf: str
    flax: tuple[str, ...]
    layout: str
    hf_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    layer: int | None = None


def _to_flax(rule: KeyRule, array: np.ndarray) -> np.ndarray:
    if rule.layout == "linear":
        return np.ascontiguousarray(array.T.reshape(rule.flax_shape))
    if rule.layout == "conv":
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return array.reshape(rule.flax_shape)


def _to_hf(rule: KeyRule, array: np.ndarray) -> np.ndarray:
    if rule.layout == "linear":
        return np.ascontiguousarray(array.reshape(rule.hf_shape[::-1]).T)
    if rule.layout == "conv":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return array.reshape(rule.hf_shape)


# --------------------------------------------------------------------------------------------
# Config translation


_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_LM_DEFAULTS = {
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
}
_LM_ARCHITECTURES = {"Qwen2ForCausalLM", "Qwen2Model", "LlamaForCausalLM", "LlamaModel"}
_VIT_FIELDS = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "layernorm_eps")
_LM_FIELDS = ("vocab_size", "width", "depth", "heads", "kv_heads", "head_dim", "mlp_dim", "rope_theta",
              "rms_eps", "qkv_bias", "tie_embeddings")


def _read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory)
    if not path.is_dir():
        raise HFImportError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    config = path / "config.json"
    if not config.is_file():
        raise HFImportError(f"{path}: no config.json")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{config}: invalid JSON ({e})") from None


def vit_config_from_hf(directory: str | Path) -> dict[str, Any]:
    """Our `vit` config fields from a SigLIP checkpoint's config.json.

    Accepts `siglip_vision_model` configs and full `siglip` configs (their `vision_config`).
    Returns dict(image_size, patch_size, width, depth, heads, mlp_dim, layernorm_eps).
    Raises HFImportError for other model types or features the ViT does not model.
    """
    raw = _read_config(directory)
    model_type = raw.get("model_type")
    if model_type == "siglip":
        raw = raw.get("vision_config") or {}
        model_type = raw.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise HFImportError(f"{directory}: model_type {model_type!r} is not supported for the ViT "
                            "(expected 'siglip_vision_model' or 'siglip')")
    get = lambda key: raw.get(key, _SIGLIP_DEFAULTS[key])  # noqa: E731  (HF omits defaults)
    if get("hidden_act") not in ("gelu_pytorch_tanh", "gelu_new"):
        raise HFImportError(f"{directory}: hidden_act {get('hidden_act')!r} not supported "
                            "(the ViT uses the tanh GELU, 'gelu_pytorch_tanh')")
    if get("num_channels") != 3:
        raise HFImportError(f"{directory}: num_channels={get('num_channels')} not supported (RGB only)")
    if get("image_size") % get("patch_size") or get("hidden_size") % get("num_attention_heads"):
        raise HFImportError(f"{directory}: image_size must divide by patch_size and hidden_size by "
                            "num_attention_heads")
    return dict(image_size=get("image_size"), patch_size=get("patch_size"), width=get("hidden_size"),
                depth=get("num_hidden_layers"), heads=get("num_attention_heads"),
                mlp_dim=get("intermediate_size"), layernorm_eps=float(get("layer_norm_eps")))


def _rope_theta(raw: Mapping[str, Any], directory: str | Path) -> float:
    """RoPE base from transformers 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise HFImportError(f"{directory}: RoPE scaling {kind!r} not supported (plain RoPE only)")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise HFImportError(f"{directory}: partial_rotary_factor={factor} not supported")
    return float(params.get("rope_theta", raw.get("rope_theta", 10_000.0)))


def lm_config_from_hf(directory: str | Path) -> dict[str, Any]:
    """Our `lm` config fields from a Qwen2/Llama checkpoint's config.json.

    Returns dict(vocab_size, width, depth, heads, kv_heads, head_dim, mlp_dim, rope_theta, rms_eps,
    qkv_bias, tie_embeddings). Raises HFImportError for other architectures and for features the
    decoder does not model (RoPE scaling, sliding-window attention, o_proj/MLP biases, ...).
    """
    raw = _read_config(directory)
    model_type = raw.get("model_type")
    if model_type not in _LM_DEFAULTS:
        raise HFImportError(f"{directory}: model_type {model_type!r} is not supported for the LM "
                            f"(expected one of {sorted(_LM_DEFAULTS)})")
    unknown_arch = set(raw.get("architectures") or []) - _LM_ARCHITECTURES
    if unknown_arch:
        raise HFImportError(f"{directory}: architecture {sorted(unknown_arch)} not supported "
                            f"(expected one of {sorted(_LM_ARCHITECTURES)})")
    defaults = _LM_DEFAULTS[model_type]
    get = lambda key: raw.get(key, defaults[key])  # noqa: E731
    problems = []
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (SwiGLU with silu only)")
    if raw.get("quantization_config"):
        problems.append("quantized weights (quantization_config)")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and none on o_proj
        sliding = [t for t in raw.get("layer_types") or [] if t != "full_attention"]
        if raw.get("use_sliding_window") or sliding:
            problems.append("sliding-window attention (use_sliding_window / layer_types)")
    else:
        qkv_bias = False
        if raw.get("attention_bias"):
            problems.append("attention_bias=True (Llama puts it on o_proj too, which we do not model)")
        if raw.get("mlp_bias"):
            problems.append("mlp_bias=True")
    if problems:
        raise HFImportError(f"{directory}: unsupported {model_type} features: " + "; ".join(problems))
    width, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise HFImportError(f"{directory}: num_attention_heads={heads} not a multiple of "
                            f"num_key_value_heads={kv_heads}")
    return dict(vocab_size=get("vocab_size"), width=width, depth=get("num_hidden_layers"), heads=heads,
                kv_heads=kv_heads, head_dim=raw.get("head_dim") or width // heads,
                mlp_dim=get("intermediate_size"), rope_theta=_rope_theta(raw, directory),
                rms_eps=float(get("rms_norm_eps")), qkv_bias=qkv_bias,
                tie_embeddings=bool(get("tie_word_embeddings")))


def _check_config(derived: Mapping[str, Any], cfg: Any, fields: Iterable[str], directory: str | Path) -> None:
    """The caller's config must describe the checkpoint; eps/theta mismatches would be silent."""
    cfg = as_config(cfg)
    diffs = []
    for field in fields:
        ours, theirs = cfg[field], derived[field]
        same = math.isclose(ours, theirs, rel_tol=1e-9) if isinstance(theirs, float) else ours == theirs
        if not same:
            diffs.append(f"{field}: config {ours!r} vs checkpoint {theirs!r}")
    if diffs:
        raise HFImportError(f"{directory}: config does not match the checkpoint: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------
# Key tables


def vit_key_table(vit_cfg: Any) -> list[KeyRule]:
    """HF `SiglipVisionModel` names (without the `vision_model.` prefix) <-> VisionTransformer params."""
    c = as_config(vit_cfg)
    w, m, p, h = c.width, c.mlp_dim, c.patch_size, c.heads
    hd = w // h
    patches = (c.image_size // p) ** 2
    rules = [
        KeyRule("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), "conv", (w, 3, p, p), (p, p, 3, w)),
        KeyRule("embeddings.patch_embedding.bias", ("patch_embed", "bias"), "reshape", (w,), (w,)),
        KeyRule("embeddings.position_embedding.weight", ("pos_embed",), "reshape", (patches, w), (patches, w)),
        KeyRule("post_layernorm.weight", ("post_ln", "ln", "scale"), "reshape", (w,), (w,)),
        KeyRule("post_layernorm.bias", ("post_ln", "ln", "bias"), "reshape", (w,), (w,)),
    ]
    for i in range(c.depth):
        hf, fx = f"encoder.layers.{i}.", ("encoder", f"layers_{i}")
        per_layer = [
            ("layer_norm1.weight", ("ln_attn", "ln", "scale"), "reshape", (w,), (w,)),
            ("layer_norm1.bias", ("ln_attn", "ln", "bias"), "reshape", (w,), (w,)),
            ("layer_norm2.weight", ("ln_mlp", "ln", "scale"), "reshape", (w,), (w,)),
            ("layer_norm2.bias", ("ln_mlp", "ln", "bias"), "reshape", (w,), (w,)),
            ("self_attn.out_proj.weight", ("attn", "out", "dense", "kernel"), "linear", (w, w), (h, hd, w)),
            ("self_attn.out_proj.bias", ("attn", "out", "dense", "bias"), "reshape", (w,), (w,)),
            ("mlp.fc1.weight", ("mlp", "up", "dense", "kernel"), "linear", (m, w), (w, m)),
            ("mlp.fc1.bias", ("mlp", "up", "dense", "bias"), "reshape", (m,), (m,)),
            ("mlp.fc2.weight", ("mlp", "down", "dense", "kernel"), "linear", (w, m), (m, w)),
            ("mlp.fc2.bias", ("mlp", "down", "dense", "bias"), "reshape", (w,), (w,)),
        ]
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
            per_layer += [
                (f"self_attn.{proj}_proj.weight", ("attn", name, "dense", "kernel"), "linear", (w, w), (w, h, hd)),
                (f"self_attn.{proj}_proj.bias", ("attn", name, "dense", "bias"), "reshape", (w,), (h, hd)),
            ]
        rules += [KeyRule(hf + k, fx + f, lay, hs, fs, i) for k, f, lay, hs, fs in per_layer]
    return rules


def lm_key_table(lm_cfg: Any) -> list[KeyRule]:
    """HF `Qwen2ForCausalLM` / `LlamaForCausalLM` names <-> DecoderLM params.

    q/k/v biases appear iff `qkv_bias`; `lm_head.weight` iff not `tie_embeddings`.
    """
    c = as_config(lm_cfg)
    w, m, v, h, kv, hd = c.width, c.mlp_dim, c.vocab_size, c.heads, c.kv_heads, c.head_dim
    rules = [
        KeyRule("model.embed_tokens.weight", ("embedding",), "reshape", (v, w), (v, w)),
        KeyRule("model.norm.weight", ("final_norm", "scale"), "reshape", (w,), (w,)),
    ]
    if not c.tie_embeddings:
        rules.append(KeyRule("lm_head.weight", ("lm_head",), "linear", (v, w), (w, v)))
    for i in range(c.depth):
        hf, fx = f"model.layers.{i}.", ("decoder", f"layers_{i}")
        per_layer = [
            ("input_layernorm.weight", ("ln_attn", "scale"), "reshape", (w,), (w,)),
            ("post_attention_layernorm.weight", ("ln_mlp", "scale"), "reshape", (w,), (w,)),
            ("self_attn.o_proj.weight", ("attn", "out", "dense", "kernel"), "linear", (w, h * hd), (h, hd, w)),
            ("mlp.gate_proj.weight", ("mlp", "gate", "dense", "kernel"), "linear", (m, w), (w, m)),
            ("mlp.up_proj.weight", ("mlp", "up", "dense", "kernel"), "linear", (m, w), (w, m)),
            ("mlp.down_proj.weight", ("mlp", "down", "dense", "kernel"), "linear", (w, m), (m, w)),
        ]
        for proj, name, heads in (("q", "query", h), ("k", "key", kv), ("v", "value", kv)):
            per_layer.append((f"self_attn.{proj}_proj.weight", ("attn", name, "dense", "kernel"), "linear",
                              (heads * hd, w), (w, heads, hd)))
            if c.qkv_bias:
                per_layer.append((f"self_attn.{proj}_proj.bias", ("attn", name, "dense", "bias"), "reshape",
                                  (heads * hd,), (heads, hd)))
        rules += [KeyRule(hf + k, fx + f, lay, hs, fs, i) for k, f, lay, hs, fs in per_layer]
    return rules


# Tensors a checkpoint may hold that we knowingly drop (canonical names).
_VIT_IGNORED = (r"head\..*",  # SigLIP attention-pooling head (vision_use_head)
                r"text_model\..*", r"logit_scale", r"logit_bias")  # text tower of a full SigLIP
_LM_IGNORED = (r".*rotary_emb\.inv_freq",)  # a buffer recomputed from rope_theta


# --------------------------------------------------------------------------------------------
# Checkpoint reading and conversion


class _Checkpoint:
    """Lazy view of the safetensors files of one checkpoint directory: name -> file."""

    def __init__(self, directory: str | Path):
        path = Path(directory)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFImportError(f"{index}: not a safetensors index ({e!r})") from None
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise HFImportError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not read)")
        self.where: dict[str, Any] = {}
        for f in files:
            if not f.is_file():
                raise HFImportError(f"{index}: names missing shard {f.name}")
            try:
                handle = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors raises its own error type for corrupt headers
                raise HFImportError(f"{f}: cannot read safetensors file ({e})") from None
            for key in handle.keys():
                self.where[key] = handle

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self.where[key].get_tensor(key)


def _list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _scanned(rule: KeyRule) -> tuple[str, ...]:
    """Flax path under `nn.scan`: "layers_{i}" -> "layers" (block i = index i of the leading axis)."""
    return tuple("layers" if part == f"layers_{rule.layer}" else part for part in rule.flax)


@dataclasses.dataclass
class Converted:
    """Result of `convert_checkpoint`: Flax params, the tensors knowingly dropped, the config."""

    params: Params
    ignored: list[str]
    config: dict[str, Any]


def _abstract_params(kind: str, cfg: Any, scan: bool) -> Params:
    """Shapes of `nn.unbox(module.init(...)["params"])`, without allocating anything."""
    cfg = as_config(cfg)
    if kind == "vit":
        module = VisionTransformer(cfg, scan=scan)
        args = (jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),)
        init = lambda: module.init(jax.random.key(0), *args)  # noqa: E731
    else:
        module = DecoderLM(cfg, scan=scan)
        tokens = jnp.zeros((1, 1), jnp.int32)
        init = lambda: module.init(jax.random.key(0), tokens, tokens >= 0, tokens,  # noqa: E731
                                   method=DecoderLM.forward_tokens)
    return nn.unbox(jax.eval_shape(init)["params"])


def _check_tree(params: Params, expected: Params) -> None:
    """The built tree must be exactly the module's param tree (guards the key table itself)."""
    flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    bad = [f"{k}: built {flat.get(k)} vs module {want.get(k)}" for k in sorted(set(flat) | set(want))
           if flat.get(k) != want.get(k)]
    if bad:
        raise HFImportError("key table does not match the module's params: " + _list(bad))


def convert_checkpoint(directory: str | Path, kind: str, cfg: Any | None = None, scan: bool = True,
                       dtype: Any = None) -> Converted:
    """Read an HF checkpoint directory into Flax params.

    Args:
      directory: local HF checkpoint (config.json + *.safetensors).
      kind: "vit" (SigLIP vision) or "lm" (Qwen2/Llama).
      cfg: our `vit` / `lm` config; None derives it from config.json. When given, it must agree
        with the checkpoint.
      scan: stack block params on a leading axis under `layers` (True) or `layers_{i}` (False).
      dtype: cast every param to this dtype; None keeps the checkpoint's dtype.
    Returns:
      `Converted(params, ignored, config)`; params is a nested dict of numpy arrays with the
      structure of `nn.unbox(module.init(...)["params"])`.
    """
    if kind not in ("vit", "lm"):
        raise ValueError(f"kind must be 'vit' or 'lm', got {kind!r}")
    derived = vit_config_from_hf(directory) if kind == "vit" else lm_config_from_hf(directory)
    fields = _VIT_FIELDS if kind == "vit" else _LM_FIELDS
    if cfg is not None:
        _check_config(derived, cfg, fields, directory)
    config = {f: as_config(cfg)[f] for f in fields} if cfg is not None else derived
    rules = vit_key_table(config) if kind == "vit" else lm_key_table(config)
    ckpt = _Checkpoint(directory)

    # Canonical name -> name in the file. Older SigLIP files prefix the tower with "vision_model.";
    # a bare Qwen2Model/LlamaModel lacks the "model." prefix.
    names = {k: k for k in ckpt.where}
    if kind == "vit" and "vision_model.embeddings.patch_embedding.weight" in ckpt.where:
        names = {k.removeprefix("vision_model."): k for k in ckpt.where}
    if kind == "lm" and "model.embed_tokens.weight" not in ckpt.where and "embed_tokens.weight" in ckpt.where:
        names = {("model." + k if k != "lm_head.weight" else k): k for k in ckpt.where}
    ignore = re.compile("|".join(_VIT_IGNORED if kind == "vit" else _LM_IGNORED))
    wanted = {r.hf for r in rules}
    ignored = [names[k] for k in names if k not in wanted and ignore.fullmatch(k)]
    if kind == "lm" and config["tie_embeddings"] and "lm_head.weight" in names:
        # Some tied checkpoints store the head anyway; it must really be the embedding.
        head, emb = ckpt.get(names["lm_head.weight"]), ckpt.get(names["model.embed_tokens.weight"])
        if head.shape != emb.shape or not np.array_equal(head, emb):
            raise HFImportError(f"{directory}: tie_word_embeddings is set but lm_head.weight differs from "
                                "model.embed_tokens.weight")
        ignored.append(names["lm_head.weight"])
    missing = sorted(wanted - set(names))
    unknown = sorted(names[k] for k in names if k not in wanted and names[k] not in ignored)
    shapes = [f"{names[r.hf]} {list(ckpt.shape(names[r.hf]))} (expected {list(r.hf_shape)})"
              for r in rules if r.hf in names and ckpt.shape(names[r.hf]) != r.hf_shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_list(missing)}")
    if unknown:
        problems.append(f"unexpected tensors: {_list(unknown)}")
    if shapes:
        problems.append(f"wrong shapes: {_list(shapes)}")
    if problems:
        raise HFImportError(f"{directory}: checkpoint does not match the {kind} key table: " + "; ".join(problems))
    if ignored:
        log.info("%s: ignored %d tensors: %s", directory, len(ignored), _list(ignored))

    params: Params = {}
    stacks: dict[tuple[str, ...], list] = {}
    for rule in rules:
        array = _to_flax(rule, ckpt.get(names[rule.hf]))
        if dtype is not None:
            array = array.astype(dtype)
        if scan and rule.layer is not None:
            stacks.setdefault(_scanned(rule), [None] * config["depth"])[rule.layer] = array
        else:
            _set(params, rule.flax, array)
    for path, arrays in stacks.items():
        _set(params, path, np.stack(arrays))
    _check_tree(params, _abstract_params(kind, config, scan))
    return Converted(params, sorted(ignored), dict(config))


def import_vit(directory: str | Path, vit_cfg: Any, scan: bool, dtype: Any = None) -> Params:
    """VisionTransformer params from a SigLIP checkpoint directory.

    `vit_cfg` None derives it from config.json; `scan`/`dtype` as in `convert_checkpoint`.
    Returns a nested dict of numpy arrays shaped like `nn.unbox(VisionTransformer.init(...)["params"])`.
    """
    return convert_checkpoint(directory, "vit", vit_cfg, scan, dtype).params


def import_lm(directory: str | Path, lm_cfg: Any, scan: bool, dtype: Any = None) -> Params:
    """DecoderLM params from a Qwen2/Llama checkpoint directory.

    `lm_cfg` None derives it from config.json; `scan`/`dtype` as in `convert_checkpoint`.
    Returns a nested dict of numpy arrays shaped like `nn.unbox(DecoderLM.init(...)["params"])`
    (`embedding [vocab, width]`, `decoder/...`, `final_norm/scale`, `lm_head [width, vocab]` if untied).
    """
    return convert_checkpoint(directory, "lm", lm_cfg, scan, dtype).params


# --------------------------------------------------------------------------------------------
# Export (the inverse mapping)


def _export(params: Params, rules: list[KeyRule]) -> dict[str, np.ndarray]:
    out = {}
    for rule in rules:
        # The tree tells whether it was scanned: "layers" (stacked) or "layers_{i}" (unrolled).
        paths = [rule.flax] if rule.layer is None else [_scanned(rule), rule.flax]
        for path in paths:
            try:
                array = np.asarray(_get(params, path))
                break
            except (KeyError, TypeError):
                continue
        else:
            raise HFImportError(f"param {'/'.join(rule.flax)} not found")
        if path != rule.flax:
            array = array[rule.layer]
        if array.shape != rule.flax_shape:
            raise HFImportError(f"param {'/'.join(rule.flax)} has shape {list(array.shape)}, "
                                f"expected {list(rule.flax_shape)}")
        out[rule.hf] = _to_hf(rule, array)
    return out


def export_vit_to_hf(params: Params, vit_cfg: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """VisionTransformer params (scanned or not) -> HF `SiglipVisionModel` state dict (numpy).

    `prefix=""` gives transformers 5 `SiglipVisionModel` names; "vision_model." the older/full-SigLIP
    names. The pooling head is not produced (load with `vision_use_head=False`).
    """
    table = vit_key_table(vit_cfg)
    return {prefix + k: v for k, v in _export(params, table).items()}


def export_lm_to_hf(params: Params, lm_cfg: Any, tied_head: bool = False) -> dict[str, np.ndarray]:
    """DecoderLM params (scanned or not) -> HF `*ForCausalLM` state dict (numpy).

    With tied embeddings `lm_head.weight` is left out (as `save_pretrained` does) unless
    `tied_head`, which adds a copy of the embedding (for a strict `load_state_dict`).
    """
    out = _export(params, lm_key_table(lm_cfg))
    if tied_head and as_config(lm_cfg).tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    return out


def load_anchor_file(path: str | Path, frozen: Params) -> tuple[Params, list[str]]:
    """The frozen anchor with the groups stored in `tools/import_hf`'s safetensors file put in.

    Args:
      path: a file written by `python -m tools.import_hf` (keys "vit/…" and/or "lm/…").
      frozen: this run's anchor params {"vit": …, "lm": …} (arrays or ShapeDtypeStructs); gives the
        structure, shapes and dtypes every stored group must match exactly.
    Returns:
      (anchor, groups): `frozen` with each stored group replaced by the file's arrays (numpy, cast to
      the target dtype), and the names of the groups that came from the file.
    Raises:
      HFImportError: unreadable file, or a stored group whose keys or shapes differ from this
        config's (a different model size, or `--no-scan` against `model.scan_layers=True`).
    """
    path = Path(path)
    if not path.is_file():
        raise HFImportError(f"model.anchor_weights={path}: no such file; write one with "
                            f"`python -m tools.import_hf --vit DIR --lm DIR --out FILE`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise HFImportError(f"model.anchor_weights={path}: not a readable safetensors file ({e})") from None
    out, groups = dict(frozen), []
    for group in ("vit", "lm"):
        keys = {k.split("/", 1)[1]: v for k, v in stored.items() if k.startswith(group + "/")}
        if not keys:
            continue
        want = {"/".join(str(p.key) for p in kp): leaf
                for kp, leaf in jax.tree_util.tree_leaves_with_path(frozen[group])}
        bad = [f"{k}: file {list(keys[k].shape) if k in keys else 'missing'} vs model "
               f"{list(want[k].shape) if k in want else 'absent'}"
               for k in sorted(set(keys) | set(want))
               if k not in keys or k not in want or tuple(keys[k].shape) != tuple(want[k].shape)]
        if bad:
            raise HFImportError(f"model.anchor_weights={path}: the {group} params do not fit this config's "
                                f"model.{group} ({_list(bad, 4)}); import with the matching config and "
                                f"model.scan_layers")
        flat = {k: np.asarray(keys[k]).astype(want[k].dtype) for k in want}
        nested: Params = {}
        for k, v in flat.items():
            _set(nested, tuple(k.split("/")), v)
        out[group] = nested
        groups.append(group)
    if not groups:
        raise HFImportError(f"model.anchor_weights={path}: holds no vit/ or lm/ params")
    return out, groups
