"""Config validation: unknown keys, wrong types and impossible values fail with one clear line.

`validate(cfg)` compares a config against the preset it claims to be (`cfg.variant` of
`configs/vla_cabin.py`) for structure and types, then checks the values. Sections register their
value checks in `CHECKS`; each check returns a list of problems.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
from typing import Callable, Sequence

import ml_collections
import numpy as np


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or has an impossible value."""


def _flatten(cfg, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _same_type(value, ref) -> bool:
    if isinstance(ref, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(ref, bool)
    if isinstance(ref, float):
        return isinstance(value, (int, float))
    if isinstance(ref, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(ref))


def check_structure(cfg, reference) -> list[str]:
    """Unknown or missing fields, and type mismatches against the reference preset."""
    got, ref = _flatten(cfg), _flatten(reference)
    problems = [f"unknown config field {k!r}: remove it or check the spelling against configs/vla_cabin.py"
                for k in sorted(set(got) - set(ref))]
    problems += [f"missing config field {k!r} (expected like {ref[k]!r})" for k in sorted(set(ref) - set(got))]
    problems += [f"config field {k!r} = {got[k]!r} has type {type(got[k]).__name__}, expected "
                 f"{type(ref[k]).__name__} (like {ref[k]!r})"
                 for k in sorted(set(got) & set(ref)) if not _same_type(got[k], ref[k])]
    return problems


def _divides(problems: list, what: str, a: int, b: int) -> None:
    if a <= 0 or b % a:
        problems.append(f"{what}: {a} must be positive and divide {b}")


def check_model(cfg) -> list[str]:
    """Shapes the model code relies on."""
    m, p = cfg.model, []
    for name in ("dtype", "param_dtype", "anchor_dtype"):
        if m[name] not in ("float32", "bfloat16", "float16"):
            p.append(f"model.{name} = {m[name]!r}: use float32, bfloat16 or float16")
    if m.remat_policy not in ("full", "dots"):
        p.append(f"model.remat_policy = {m.remat_policy!r}: use 'full' or 'dots'")
    if m.attention_impl not in ("", "xla", "cudnn"):
        p.append(f"model.attention_impl = {m.attention_impl!r}: use '' (auto), 'xla' or 'cudnn'")
    if m.bridge.connector_reads not in ("queries", "all"):
        p.append(f"model.bridge.connector_reads = {m.bridge.connector_reads!r}: use 'queries' or 'all'")
    for stack in ("encoder", "bridge.connector", "dnfm", "explain"):
        s = m
        for part in stack.split("."):
            s = s[part]
        _divides(p, f"model.{stack}.heads vs width", s.heads, s.width)
        if min(s.depth, s.mlp_dim) <= 0:
            p.append(f"model.{stack}: depth and mlp_dim must be positive")
    _divides(p, "model.vit.heads vs width", m.vit.heads, m.vit.width)
    if not 0 < m.vit.patch_size <= m.vit.image_size:
        # Like SigLIP-so400m/14 at 384, a remainder is allowed: the patch conv drops it.
        p.append(f"model.vit.patch_size = {m.vit.patch_size}: must be in 1..image_size ({m.vit.image_size})")
    _divides(p, "model.lm.kv_heads vs heads", m.lm.kv_heads, m.lm.heads)
    if m.lm.head_dim % 2:
        p.append(f"model.lm.head_dim = {m.lm.head_dim}: RoPE needs an even head_dim")
    if not 1 <= m.dnfm.sample_steps <= 8:
        p.append(f"model.dnfm.sample_steps = {m.dnfm.sample_steps}: the sampler supports K = 1..8")
    if m.dnfm.temperature <= 0:
        p.append("model.dnfm.temperature must be > 0")
    if m.action_len < 2 or m.explain_len < 3:
        p.append("model.action_len must be >= 2 and model.explain_len >= 3 (room for <eos>)")
    if m.explain.vocab_size != m.lm.vocab_size:
        p.append("model.explain.vocab_size must equal model.lm.vocab_size (one text tokenizer)")
    for name in ("d_latent", "tokens_per_modality"):
        if m.latent[name] <= 0:
            p.append(f"model.latent.{name} must be positive")
    if m.bridge.n_queries <= 0:
        p.append("model.bridge.n_queries must be positive")
    if m.dnfm.layout not in ("sequence", "per_setting"):
        p.append(f"model.dnfm.layout = {m.dnfm.layout!r}: use 'sequence' or 'per_setting'")
    if m.action_head not in ("dnfm", "autoregressive"):
        p.append(f"model.action_head = {m.action_head!r}: use 'dnfm' or 'autoregressive'")
    if not 0 <= m.state.numeric_fourier <= 16:
        p.append(f"model.state.numeric_fourier = {m.state.numeric_fourier}: use 0 (off) .. 16 frequencies")
    return p + check_lora(cfg)


def check_lora(cfg) -> list[str]:
    """`model.lora` and the `train.trainable` switch that goes with it."""
    from vlacabin_jax.model.lora import TARGETS, parse_targets

    lo, p = cfg.model.lora, []
    if lo.rank < 0:
        p.append(f"model.lora.rank = {lo.rank}: must be >= 0 (0 turns LoRA off)")
    if lo.alpha <= 0:
        p.append(f"model.lora.alpha = {lo.alpha}: must be > 0 (the adapter scale is alpha / rank)")
    targets = parse_targets(lo.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.append(f"model.lora.targets = {lo.targets!r}: unknown layer {unknown[0]!r}; use a comma-separated "
                 f"subset of {','.join(TARGETS)}")
    elif lo.rank > 0 and not targets:
        p.append(f"model.lora.targets is empty but model.lora.rank = {lo.rank}: name the layers, e.g. "
                 "'query,key,value,out,up,down', or set rank 0")
    if cfg.train.trainable not in TRAINABLE:
        p.append(f"train.trainable = {cfg.train.trainable!r}: use one of {', '.join(TRAINABLE)}")
    elif cfg.train.trainable == "all_and_anchor" and cfg.model.anchor_weights:
        p.append("train.trainable = 'all_and_anchor' with model.anchor_weights: imported anchors stay frozen; "
                 "use train.trainable=all (or drop model.anchor_weights to train a random anchor)")
    elif cfg.train.trainable == "lora_and_heads" and lo.rank <= 0:
        p.append("train.trainable = 'lora_and_heads' needs adapters: set model.lora.rank > 0 "
                 "(e.g. --config.model.lora.rank=8)")
    return p


def check_schema_sizes(cfg) -> list[str]:
    """Sizes the config copies from the data schemas must match the live schemas."""
    from vlacabin_jax.data import schema_sizes

    sizes, m, p = schema_sizes(), cfg.model, []
    pairs = {"model.dnfm.vocab_size": (m.dnfm.vocab_size, sizes["action_vocab"]),
             "model.state.numeric_dim": (m.state.numeric_dim, sizes["state_numeric"]),
             "model.state.categorical_sizes": (tuple(m.state.categorical_sizes), tuple(sizes["state_categorical"])),
             "model.bridge.n_constraint_tags": (m.bridge.n_constraint_tags, sizes["constraint_tags"])}
    for name, (got, want) in pairs.items():
        if got != want:
            p.append(f"{name} = {got} but the data schema has {want}: do not override it (it follows the schema)")
    return p


def check_loss_and_data(cfg) -> list[str]:
    lo, d, p = cfg.loss, cfg.data, []
    for key, value in lo.items():
        if key.endswith("_weight") and value < 0:
            p.append(f"loss.{key} = {value}: weights must be >= 0")
    if not 0.0 < lo.keep_weight <= 1.0:
        p.append(f"loss.keep_weight = {lo.keep_weight}: must lie in (0, 1] (the weight of 'keep' positions "
                 "under model.dnfm.layout = 'per_setting')")
    if not 0.0 <= lo.t_source_fraction <= 1.0:
        p.append(f"loss.t_source_fraction = {lo.t_source_fraction}: must lie in [0, 1]")
    if lo.t_beta <= 0 or lo.infonce_temperature <= 0 or lo.kl_warmup_steps < 0:
        p.append("loss.t_beta and loss.infonce_temperature must be > 0, loss.kl_warmup_steps >= 0")
    for key in ("text_len", "mel_frames", "num_frames"):
        if d[key] <= 0:
            p.append(f"data.{key} = {d[key]}: must be positive")
    if cfg.model.anchor_weights and not os.path.isfile(cfg.model.anchor_weights):
        p.append(f"model.anchor_weights = {cfg.model.anchor_weights!r}: no such file; write it with "
                 "`python -m tools.import_hf --vit DIR --lm DIR --out FILE` or leave it empty")
    if d.tokenizer and not os.path.isfile(os.path.join(d.tokenizer, "tokenizer.json")):
        p.append(f"data.tokenizer = {d.tokenizer!r}: no tokenizer.json there; point it at the anchor LM's "
                 "directory or leave it empty for the packaged tokenizer")
    return p


STAGES = ("joint", "pretrain", "sft", "align")
TRAINABLE = ("all", "all_and_anchor", "lora_and_heads")  # see train.trainable in configs/vla_cabin.py


def check_train(cfg) -> list[str]:
    """The `train`, `optim` and `checkpoint` sections (vlacabin_jax/train/)."""
    t, o, ck, p = cfg.train, cfg.optim, cfg.checkpoint, []
    if t.stage not in STAGES:
        p.append(f"train.stage = {t.stage!r}: use one of {', '.join(STAGES)}")
    for name in ("steps", "global_batch_size", "grad_accum_steps", "log_every"):
        if t[name] <= 0:
            p.append(f"train.{name} = {t[name]}: must be positive")
    if t.grad_accum_steps > 0 and t.global_batch_size % t.grad_accum_steps:
        p.append(f"train.global_batch_size = {t.global_batch_size} must be a multiple of "
                 f"train.grad_accum_steps = {t.grad_accum_steps}")
    if t.eval_every < 0 or t.eval_batches < 0 or t.max_rollbacks < 0 or t.eval_cabin_samples < 0:
        p.append("train.eval_every, train.eval_batches, train.eval_cabin_samples and train.max_rollbacks "
                 "must be >= 0")
    if t.eval_every > 0 and t.log_every > 0 and t.eval_every % t.log_every:
        p.append(f"train.eval_every = {t.eval_every} must be a multiple of train.log_every = {t.log_every} "
                 f"(eval results are written with that step's log row)")
    if t.eval_every > 0 and t.eval_batches == 0:
        p.append("train.eval_batches must be > 0 when train.eval_every > 0")
    if t.profile_steps < 0 or t.profile_start < 0:
        p.append("train.profile_steps and train.profile_start must be >= 0")
    if t.inject_nan_batch < -1:
        p.append("train.inject_nan_batch must be -1 (off) or a batch index")
    if o.lr <= 0 or o.warmup_steps < 0 or not 0.0 <= o.end_lr_factor <= 1.0:
        p.append("optim.lr must be > 0, optim.warmup_steps >= 0, optim.end_lr_factor in [0, 1]")
    if not (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0) or o.eps <= 0:
        p.append(f"optim.b1 = {o.b1}, optim.b2 = {o.b2} must lie in [0, 1) and optim.eps > 0")
    if o.weight_decay < 0 or o.clip_norm < 0:
        p.append("optim.weight_decay and optim.clip_norm must be >= 0 (clip_norm 0 turns clipping off)")
    if ck.interval_minutes <= 0 or ck.every_steps < 0 or ck.keep < 1:
        p.append("checkpoint.interval_minutes must be > 0, checkpoint.every_steps >= 0 (0: off), "
                 "checkpoint.keep >= 1")
    mesh = [cfg.mesh[a] for a in ("data", "fsdp", "tensor")]
    if any(s == 0 or s < -1 for s in mesh) or mesh.count(-1) > 1:
        p.append(f"mesh (data, fsdp, tensor) = {tuple(mesh)}: sizes must be positive, at most one -1")
    elif cfg.mesh.tensor > 0:
        m = cfg.model
        for name, heads in (("encoder", m.encoder.heads), ("bridge.connector", m.bridge.connector.heads),
                            ("dnfm", m.dnfm.heads), ("explain", m.explain.heads), ("vit", m.vit.heads),
                            ("lm", m.lm.heads)):
            if heads % cfg.mesh.tensor:
                p.append(f"mesh.tensor = {cfg.mesh.tensor} does not divide model.{name}.heads = {heads}")
    return p


def check_align(cfg) -> list[str]:
    """Preference alignment: the DPO loss, its pairs and its reference exist only in stage `align`."""
    from vlacabin_jax.data.spec import MIX_KINDS, PREFERENCE_KINDS

    lo, d, t, p = cfg.loss, cfg.data, cfg.train, []
    mix = dict.fromkeys(MIX_KINDS, 0.0)
    for part in filter(None, (x.strip() for x in d.mixture.split(","))):  # `pipeline.parse_mixture`'s format
        name, _, value = (x.strip() for x in part.partition("="))
        try:
            mix[name] = float(value) if name in mix else float("nan")
        except ValueError:
            mix[name] = float("nan")
        if not mix[name] >= 0:
            return [f"data.mixture = {d.mixture!r}: {part!r} is not kind=weight with a kind of "
                    f"{', '.join(MIX_KINDS)} and a weight >= 0"]
    pairs = [k for k in PREFERENCE_KINDS if mix[k] > 0]
    if t.stage == "align":
        if not t.init_from:
            p.append("train.stage = 'align' needs train.init_from=<the sft run's checkpoints/>: its DNFM is "
                     "the frozen DPO reference and its params the start")
        if lo.dpo_weight <= 0 or lo.dpo_beta <= 0:
            p.append(f"stage align: loss.dpo_weight = {lo.dpo_weight} and loss.dpo_beta = {lo.dpo_beta} must be > 0")
        if not pairs:
            p.append(f"stage align: data.mixture = {d.mixture!r} has no preference pairs; add "
                     f"preference=1 and/or preference_sim=1")
    else:
        if lo.dpo_weight != 0:
            p.append(f"loss.dpo_weight = {lo.dpo_weight}: the DPO loss needs a reference model, which only "
                     f"train.stage = 'align' keeps; set it to 0")
        if pairs:
            p.append(f"data.mixture reads preference pairs ({', '.join(pairs)}) but train.stage = "
                     f"{t.stage!r}; pairs are for stage 'align'")
    if mix["preference"] > 0 and d.source != "synthetic":
        p.append("data.mixture kind 'preference' is the synthetic world's pairs and needs data.source = "
                 "'synthetic'; use preference_sim pairs from `python -m tools.make_preferences` instead")
    if mix["preference_sim"] > 0 and not os.path.isfile(os.path.join(d.preference_dir, "manifest.json")):
        p.append(f"data.mixture reads preference_sim but data.preference_dir = {d.preference_dir!r} holds no "
                 f"manifest.json; write pairs with `python -m tools.make_preferences`")
    if d.preference_dir and mix["preference_sim"] == 0:
        p.append(f"data.preference_dir = {d.preference_dir!r} is set but data.mixture gives preference_sim "
                 f"no weight; add preference_sim=1 or leave it empty")
    return p


CHECKS: list[Callable[[ml_collections.ConfigDict], list[str]]] = [check_model, check_schema_sizes,
                                                                   check_loss_and_data, check_train,
                                                                   check_align]


def validate(cfg: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> None:
    """Raise `ConfigError` listing every problem (first line names the first one).

    Args:
      cfg: the config to check.
      reference: the preset to compare structure and types with; default
        `configs.vla_cabin.get_config(cfg.variant)`.
    """
    if reference is None:
        from configs.vla_cabin import VARIANTS, get_config

        if cfg.get("variant") not in VARIANTS:
            raise ConfigError(f"config field 'variant' = {cfg.get('variant')!r}: use one of {', '.join(VARIANTS)}")
        reference = get_config(cfg.variant)
    problems = check_structure(cfg, reference)
    if not problems:
        for check in CHECKS:
            problems += check(cfg)
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


# Fields added after the first checkpoints, with the value the model had before them (what a
# checkpoint saved without the field was trained with); `with_legacy_defaults` fills them in.
LEGACY_DEFAULTS = {
    "model.bridge.connector_reads": "queries",
    "model.bridge.connector_skip": False,
    "model.state.field_tokens": False,
    "model.state.numeric_fourier": 0,
    "model.video.patch_tokens": False,
    "model.dnfm.cross_attention": False,
    "model.dnfm.constrained_decode": False,  # the per-position argmax
    "model.dnfm.layout": "sequence",  # one DNFM position per answer token
    "model.action_head": "dnfm",
    "model.latent.init_logvar": 0.0,
}


def with_legacy_defaults(saved: dict) -> dict:
    """A saved config's JSON dict with every `LEGACY_DEFAULTS` field it lacks set to its legacy
    value (a copy; the fields it has keep theirs), so it rebuilds the model it was saved with
    rather than today's preset."""
    out = copy.deepcopy(saved)
    for path, value in LEGACY_DEFAULTS.items():
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return out


def config_to_json_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    def plain(x):
        if isinstance(x, (ml_collections.ConfigDict, dict)):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x
    return plain(cfg)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path.py:variant` (a config file's `get_config(variant)`) plus `--config.a.b=value`
    overrides (values parsed as Python literals, else kept as strings), validated.

    Relative paths are taken from the working directory. Raises `ConfigError` with one line for a
    missing file, a file that does not load, a malformed override, an unknown field or a bad value.
    """
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path} (give configs/vla_cabin.py:VARIANT)")
    mod_spec = importlib.util.spec_from_file_location("_vlacabin_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        cfg = module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # a config file can fail in any way; all mean "not a usable config"
        raise ConfigError(f"--config {spec}: {type(e).__name__}: {e}") from e
    for item in overrides:
        key, eq, text = item.removeprefix("--config.").partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like --config.a.b=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
            if node is None:
                break
        if node is None or leaf not in node:
            raise ConfigError(f"override {item!r}: no config field {key}")
        try:  # ConfigDict refuses a value of another type (e.g. a string for an int field)
            node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and isinstance(value, list) else value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    validate(cfg)
    return cfg
