"""Flax param trees → the PyTorch mirror's state dict, through one explicit table of `Rule`s.

    state = flax_to_torch(trainable, frozen, config)      # {torch name: float32 numpy array}

LoRA adapters (`model.lora.rank > 0`) are folded into their base kernels first
(`W + alpha / rank · A @ B`, `vlacabin_jax.model.lora.merge`): the mirror has no LoRA ops.

The anchor rows come from `hf_import`'s key tables (the mirror's anchor uses Hugging Face names);
the trainable rows are spelled out below, one function per Flax module. Strict both ways: every
mirror tensor is produced exactly once with the mirror's shape, and every Flax param is either
converted or listed in `TRAINING_ONLY` (log-variance heads, reconstruction heads, an untied LM
head: inference uses none of them). Anything else is a `ConversionError` naming the keys. The two
param groups are merged first, so the anchor converts from `frozen` (train.trainable "all",
"lora_and_heads") or from `trainable` ("all_and_anchor") alike. A model with
`model.action_head = "autoregressive"` has no mirror and is refused with one line.

Layouts (Flax → torch):
  linear  Dense kernel [in..., out...] → weight [out, in] (per-head kernels flattened first:
          query [D, H, hd] → [D, H*hd] → transpose; out [H, hd, D] → [H*hd, D] → transpose)
  bias    reshape to the torch shape (per-head bias [H, hd] → [H*hd])
  copy    same shape (embeddings, queries, norm scales)
  conv1d  [k, in, out] → [out, in, k];  conv2d  HWIO → OIHW
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from vlacabin_jax.export.torch_model import VLACabinMirror, namespace, unsupported_action_head
from vlacabin_jax.hf_import import KeyRule, lm_key_table, vit_key_table
from vlacabin_jax.model import lora
from vlacabin_jax.model.functional import merge_params

Params = Mapping[str, Any]

# Flax params the inference path never reads (regexes over "/"-joined paths).
TRAINING_ONLY = (
    r"(speech|text|video|state)_encoder/gaussian/logvar/.*",  # latent log-variances (inference: means)
    r"connector/z0/logvar/.*",  # z0 log-variance (inference: the z0 mean)
    r"reconstruction/.*",  # reconstruction heads (training losses only)
    r"lm/lm_head",  # an untied LM head: the bridge reads hidden states, not logits
)


class ConversionError(ValueError):
    """The param tree and the mirror do not correspond (missing, unknown or misshapen params)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One mirror tensor ← one Flax param.

    torch: state-dict name in the mirror. flax: param path in the unrolled layout (`layers_{i}`).
    layout: linear | bias | copy | conv1d | conv2d (see the module docstring).
    layer: block index when the path is inside a layer stack (scanned trees hold it at index
      `layer` of the stacked param under `layers`), else None.
    """

    torch: str
    flax: tuple[str, ...]
    layout: str
    layer: int | None = None


Rules = list[Rule]


def _dense(t: str, f: tuple, layer: int | None, bias: bool = True) -> Rules:
    rules = [Rule(f"{t}.weight", f + ("dense", "kernel"), "linear", layer)]
    return rules + ([Rule(f"{t}.bias", f + ("dense", "bias"), "bias", layer)] if bias else [])


def _ln(t: str, f: tuple, layer: int | None) -> Rules:
    return [Rule(f"{t}.weight", f + ("ln", "scale"), "copy", layer),
            Rule(f"{t}.bias", f + ("ln", "bias"), "copy", layer)]


def _attn(t: str, f: tuple, layer: int | None) -> Rules:
    return [r for name in ("query", "key", "value", "out") for r in _dense(f"{t}.{name}", f + (name,), layer)]


def _mlp(t: str, f: tuple, layer: int | None) -> Rules:
    return _dense(f"{t}.up", f + ("up",), layer) + _dense(f"{t}.down", f + ("down",), layer)


def _encoder_block(t: str, f: tuple, i: int) -> Rules:
    return (_ln(f"{t}.ln_attn", f + ("ln_attn",), i) + _attn(f"{t}.attn", f + ("attn",), i)
            + _ln(f"{t}.ln_mlp", f + ("ln_mlp",), i) + _mlp(f"{t}.mlp", f + ("mlp",), i))


def _adaln_block(t: str, f: tuple, i: int) -> Rules:  # its modulated LayerNorms have no params
    return (_dense(f"{t}.modulation", f + ("modulation",), i) + _attn(f"{t}.attn", f + ("attn",), i)
            + _mlp(f"{t}.mlp", f + ("mlp",), i))


def _adaln_cross_block(t: str, f: tuple, i: int) -> Rules:  # + `model.dnfm.cross_attention`
    return (_adaln_block(t, f, i) + _ln(f"{t}.ln_cross", f + ("ln_cross",), i)
            + _attn(f"{t}.cross_attn", f + ("cross_attn",), i))


def _explain_block(t: str, f: tuple, i: int) -> Rules:
    return (_ln(f"{t}.ln_self", f + ("ln_self",), i) + _attn(f"{t}.self_attn", f + ("self_attn",), i)
            + _ln(f"{t}.ln_cross", f + ("ln_cross",), i) + _attn(f"{t}.cross_attn", f + ("cross_attn",), i)
            + _ln(f"{t}.ln_mlp", f + ("ln_mlp",), i) + _mlp(f"{t}.mlp", f + ("mlp",), i))


def _stack(t: str, f: tuple, depth: int, block: Callable[[str, tuple, int], Rules]) -> Rules:
    return [r for i in range(depth) for r in block(f"{t}.layers.{i}", f + (f"layers_{i}",), i)]


def _pool(t: str, f: tuple) -> Rules:
    return ([Rule(f"{t}.queries", f + ("queries",), "copy")] + _attn(f"{t}.attn", f + ("attn",), None)
            + _ln(f"{t}.ln", f + ("ln",), None))


def _mean(t: str, f: tuple) -> Rules:
    return _dense(f"{t}.mean", f + ("mean",), None)


def _anchor(prefix: str, table: Iterable[KeyRule]) -> Rules:
    layouts = {"linear": "linear", "reshape": "bias", "conv": "conv2d"}
    return [Rule(f"{prefix}.{k.hf}", (prefix,) + k.flax, layouts[k.layout], k.layer) for k in table
            if k.hf != "lm_head.weight"]


def rule_table(model_cfg: Any) -> Rules:
    """Every mirror tensor and where it comes from, for a `model` config (ConfigDict or dict).

    The config's route switches decide which modules exist (see `torch_model`'s docstring):
    `state.field_tokens` drops the state pool, `video.patch_tokens` adds the patch positions and
    the video pool, `bridge.connector_skip` the skip projection, `dnfm.cross_attention` each
    block's `ln_cross` and `cross_attn`. `dnfm.layout` changes shapes only (the DNFM's positions),
    which the mirror holds.
    """
    m = namespace(model_cfg) if isinstance(model_cfg, Mapping) else model_cfg
    enc, con, dn, ex = m.encoder.depth, m.bridge.connector.depth, m.dnfm.depth, m.explain.depth
    R = Rule
    rules = _anchor("vit", vit_key_table(m.vit)) + _anchor("lm", lm_key_table(m.lm))
    # Speech: two convs, encoder stack, LN, mean head.
    rules += [R("speech_encoder.conv_0.weight", ("speech_encoder", "conv_0", "kernel"), "conv1d"),
              R("speech_encoder.conv_0.bias", ("speech_encoder", "conv_0", "bias"), "copy"),
              R("speech_encoder.conv_1.weight", ("speech_encoder", "conv_1", "kernel"), "conv1d"),
              R("speech_encoder.conv_1.bias", ("speech_encoder", "conv_1", "bias"), "copy")]
    rules += _stack("speech_encoder.encoder", ("speech_encoder", "encoder"), enc, _encoder_block)
    rules += _ln("speech_encoder.ln", ("speech_encoder", "ln"), None)
    rules += _mean("speech_encoder.gaussian", ("speech_encoder", "gaussian"))
    # Text: projection (no bias), encoder stack, attention pool, mean head.
    rules += _dense("text_encoder.proj", ("text_encoder", "proj"), None, bias=False)
    rules += _stack("text_encoder.encoder", ("text_encoder", "encoder"), enc, _encoder_block)
    rules += _pool("text_encoder.pool", ("text_encoder", "pool"))
    rules += _mean("text_encoder.gaussian", ("text_encoder", "gaussian"))
    # Video: projection (no bias), [patch positions,] temporal stack, LN, [attention pool,] mean head.
    rules += _dense("video_encoder.proj", ("video_encoder", "proj"), None, bias=False)
    if m.video.patch_tokens:
        rules += [R("video_encoder.patch_position_embedding", ("video_encoder", "patch_position_embedding"), "copy")]
    rules += _stack("video_encoder.temporal", ("video_encoder", "temporal"), enc, _encoder_block)
    rules += _ln("video_encoder.ln", ("video_encoder", "ln"), None)
    if m.video.patch_tokens:
        rules += _pool("video_encoder.pool", ("video_encoder", "pool"))
    rules += _mean("video_encoder.gaussian", ("video_encoder", "gaussian"))
    # State: per-field maps [n_num, 1 + 2 * numeric_fourier, width], categorical table, residual
    # MLP, [attention pool,] mean head.
    rules += [R("state_encoder.numeric_scale", ("state_encoder", "numeric_scale"), "copy"),
              R("state_encoder.numeric_shift", ("state_encoder", "numeric_shift"), "copy"),
              R("state_encoder.categorical.weight", ("state_encoder", "categorical", "embedding"), "copy")]
    rules += _ln("state_encoder.ln_mlp", ("state_encoder", "ln_mlp"), None)
    rules += _mlp("state_encoder.mlp", ("state_encoder", "mlp"), None)
    if not m.state.field_tokens:
        rules += _pool("state_encoder.pool", ("state_encoder", "pool"))
    rules += _mean("state_encoder.gaussian", ("state_encoder", "gaussian"))
    # Bridge: latent, tag and action-log tokens; queries; connector [with its skip projection].
    rules += _dense("bridge_inputs.latent_proj", ("bridge_inputs", "latent_proj"), None)
    rules += [R("bridge_inputs.modality_embedding", ("bridge_inputs", "modality_embedding"), "copy"),
              R("bridge_inputs.tag_embedding", ("bridge_inputs", "tag_embedding"), "copy")]
    rules += _dense("bridge_inputs.temporal_proj", ("bridge_inputs", "temporal_proj"), None, bias=False)
    for name in ("history_action_embedding", "history_before_embedding"):
        rules += [R(f"bridge_inputs.{name}.weight", ("bridge_inputs", name, "embedding"), "copy")]
    rules += _dense("bridge_inputs.history_order_proj", ("bridge_inputs", "history_order_proj"), None, bias=False)
    rules += [R("queries.queries", ("queries", "queries"), "copy")]
    rules += _dense("connector.proj", ("connector", "proj"), None)
    if m.bridge.connector_skip:
        rules += _dense("connector.skip_proj", ("connector", "skip_proj"), None, bias=False)
    rules += _stack("connector.encoder", ("connector", "encoder"), con, _encoder_block)
    rules += _ln("connector.ln", ("connector", "ln"), None)
    rules += [R("connector.query_to_action", ("connector", "query_to_action"), "copy"),
              R("connector.action_slot_embedding", ("connector", "action_slot_embedding"), "copy")]
    rules += _mean("connector.z0", ("connector", "z0"))
    # DNFM.
    rules += [R("dnfm.action_codebook", ("dnfm", "action_codebook"), "copy"),
              R("dnfm.position_embedding", ("dnfm", "position_embedding"), "copy")]
    for name in ("in_proj", "time_in", "time_out", "final_modulation", "out_proj"):
        rules += _dense(f"dnfm.{name}", ("dnfm", name), None)
    block = _adaln_cross_block if m.dnfm.cross_attention else _adaln_block
    rules += _stack("dnfm.blocks", ("dnfm", "blocks"), dn, block)
    # Explanation head (its output projection is tied to token_embedding).
    rules += [R("explanation.token_embedding.weight", ("explanation", "token_embedding", "embedding"), "copy"),
              R("explanation.position_embedding", ("explanation", "position_embedding"), "copy")]
    rules += _dense("explanation.context_proj", ("explanation", "context_proj"), None)
    rules += _stack("explanation.decoder", ("explanation", "decoder"), ex, _explain_block)
    rules += _ln("explanation.ln_out", ("explanation", "ln_out"), None)
    return rules


def transform(layout: str, array: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """One Flax array → its torch layout (see the module docstring)."""
    if layout == "linear":
        # The output axes are a suffix of the kernel's axes whose product is the torch row count.
        out = torch_shape[0]
        suffixes = [int(np.prod(array.shape[i:])) for i in range(array.ndim)]
        if out not in suffixes:
            raise ConversionError(f"kernel {list(array.shape)} cannot become a Linear weight {list(torch_shape)}")
        return np.ascontiguousarray(array.reshape(-1, out).T)
    if layout == "conv1d":
        return np.ascontiguousarray(array.transpose(2, 1, 0))
    if layout == "conv2d":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if layout == "bias":
        return array.reshape(torch_shape)
    if layout == "copy":
        return array
    raise ValueError(f"unknown layout {layout!r}")


def flat_paths(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict → {path tuple: leaf}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat_paths(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def _stacked(rule: Rule) -> tuple[str, ...]:
    return tuple("layers" if part == f"layers_{rule.layer}" else part for part in rule.flax)


def mirror_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the mirror's state dict, built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = VLACabinMirror(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def flax_to_torch(trainable: Params, frozen: Params, config: Mapping[str, Any],
                  dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Convert unboxed Flax params (scanned or unrolled stacks, any float dtype) to the mirror.

    Args:
      trainable, frozen: the two param groups of `functional.init_params` / a checkpoint (nested
        dicts of numpy or JAX arrays; bf16 anchors are widened exactly); LoRA adapters in them are
        merged into their kernels with the scale of `config["model"]["lora"]`. Only their union
        matters: the anchor (`vit`, `lm`) sits in `frozen` under train.trainable "all" /
        "lora_and_heads" and in `trainable` (float32) under "all_and_anchor".
      config: the mirror config (`config.json` contents; its "model" entry is read).
      dtype: numpy dtype of the output arrays (float32 keeps every value exactly).
    Returns:
      {mirror state-dict name: array}, exactly the mirror's names and shapes.
    Raises:
      ConversionError listing missing, unknown and misshapen params.
    """
    head = config["model"].get("action_head", "dnfm")
    if head != "dnfm":
        raise ConversionError(unsupported_action_head(head))
    params = merge_params(trainable, frozen)
    adapters = lora.LoRA.from_config(config["model"])
    if adapters.rank:  # without model.lora, stray adapters stay and are reported as unknown below
        params = lora.merge(params, adapters.scale)
    flat = flat_paths(params)
    rules = rule_table(config["model"])
    shapes = mirror_shapes(config)
    problems: list[str] = []
    names = [r.torch for r in rules]
    if len(set(names)) != len(names) or set(names) != set(shapes):
        # The table itself disagrees with the mirror: a bug here, not in the checkpoint.
        problems.append(f"rule table vs mirror: missing {sorted(set(shapes) - set(names))[:8]}, "
                        f"extra {sorted(set(names) - set(shapes))[:8]}")
    out, used = {}, set()
    for rule in rules:
        path = rule.flax if rule.flax in flat else _stacked(rule)
        if path not in flat:
            problems.append(f"missing Flax param {'/'.join(rule.flax)}")
            continue
        used.add(path)
        array = np.asarray(flat[path])
        if path != rule.flax:
            array = array[rule.layer]
        array = array.astype(dtype)
        try:
            converted = transform(rule.layout, array, shapes.get(rule.torch, array.shape))
        except (ConversionError, ValueError) as e:
            problems.append(f"{'/'.join(rule.flax)} → {rule.torch}: {e}")
            continue
        if rule.torch in shapes and converted.shape != shapes[rule.torch]:
            problems.append(f"{'/'.join(rule.flax)} {list(array.shape)} → {rule.torch} {list(converted.shape)}, "
                            f"mirror expects {list(shapes[rule.torch])}")
            continue
        out[rule.torch] = np.ascontiguousarray(converted)
    ignore = re.compile("|".join(TRAINING_ONLY))
    unknown = sorted("/".join(p) for p in flat if p not in used and not ignore.fullmatch("/".join(p)))
    if unknown:
        problems.append(f"Flax params with no place in the mirror: {unknown[:8]}"
                        + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    if problems:
        raise ConversionError("param tree does not match the export mirror: " + "; ".join(problems))
    return out


def training_only(trainable: Params, frozen: Params) -> list[str]:
    """The Flax params the conversion leaves out on purpose ("/"-joined paths)."""
    ignore = re.compile("|".join(TRAINING_ONLY))
    return sorted(p for p in ("/".join(k) for k in flat_paths(merge_params(trainable, frozen)))
                  if ignore.fullmatch(p))


def mirror_config(cfg: Any, steps: int, **extra: Any) -> dict[str, Any]:
    """config.json of the mirror from a full config (`ml_collections`): the model section, the
    input lengths of the data section, the sampler's K, under `model.dnfm.layout = "per_setting"`
    the layout's tables (`setting_layout_json`), and `extra` (provenance) entries."""
    from vlacabin_jax.export.torch_model import FORMAT, FORMAT_VERSION, MAX_STEPS

    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"sampler steps K={steps!r} not supported: the DNFM sampler is exported for "
                         f"K = 1..{MAX_STEPS}")
    model = _plain(cfg.model.to_dict())
    tables = {}
    if model["dnfm"].get("layout", "sequence") == "per_setting":
        tables = {"setting_layout": setting_layout_json(int(model["dnfm"]["vocab_size"]))}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": str(cfg.get("variant", "")),
            "steps": steps, "model": model,
            "data": {"text_len": int(cfg.data.text_len), "mel_frames": int(cfg.data.mel_frames),
                     "num_frames": int(cfg.data.num_frames)},
            **tables, **extra}


def setting_layout_json(vocab_size: int) -> dict[str, list]:
    """`setting_layout.layout_tables()` as JSON lists: the mirror reads them from config.json
    (`torch_model.setting_layout_tables`) because `setting_layout` imports JAX and the mirror must not.
    value_mask is not stored: it is `path_of_token == p`, or `<pad>`."""
    from vlacabin_jax.model import setting_layout

    tables = setting_layout.layout_tables()
    if len(tables.path_of_token) != vocab_size:
        raise ValueError(f"model.dnfm.vocab_size = {vocab_size}, but the per-setting tables cover "
                         f"{len(tables.path_of_token)} action ids")
    return {"paths": list(tables.paths), "path_of_token": [int(i) for i in tables.path_of_token],
            "decode_rank": [int(r) for r in tables.decode_rank]}


def _plain(obj: Any) -> Any:
    """ConfigDict.to_dict() output → JSON-able (tuples → lists, numpy scalars → Python)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
