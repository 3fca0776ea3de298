"""Config presets validate; unknown keys, wrong types and impossible values fail clearly."""
import re

import pytest

from configs.vla_cabin import VARIANTS, get_config
from vlacabin_jax.config import LEGACY_DEFAULTS, ConfigError, validate, with_legacy_defaults


@pytest.mark.parametrize("variant", VARIANTS)
def test_presets_are_valid(variant):
    validate(get_config(variant))


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        get_config("huge")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.model.unlock().__setitem__("dropout", 0.1), "unknown config field 'model.dropout'"),
    (lambda c: c.model.lm.__setitem__("kv_heads", 3), "kv_heads vs heads: 3 must be positive and divide 4"),
    (lambda c: c.model.dnfm.__setitem__("sample_steps", 9), "sampler supports K = 1..8"),
    (lambda c: c.model.__setitem__("dtype", "float64"), "model.dtype = 'float64'"),
    (lambda c: c.model.__setitem__("remat_policy", "some"), "model.remat_policy = 'some': use 'full' or 'dots'"),
    (lambda c: c.model.vit.__setitem__("patch_size", 64), "patch_size = 64: must be in 1..image_size (32)"),
    (lambda c: c.loss.__setitem__("t_source_fraction", 1.5), "t_source_fraction = 1.5"),
    (lambda c: c.model.dnfm.__setitem__("vocab_size", 99), "data schema has"),
    (lambda c: c.model.bridge.connector.__setitem__("heads", 5), "connector.heads vs width"),
    (lambda c: c.model.lora.__setitem__("rank", -1), "model.lora.rank = -1: must be >= 0"),
    (lambda c: c.model.lora.update(rank=8, alpha=0.0), "model.lora.alpha = 0.0: must be > 0"),
    (lambda c: c.model.lora.update(rank=8, targets="query,q_proj"), "unknown layer 'q_proj'"),
    (lambda c: c.model.lora.update(rank=8, targets=" , "), "model.lora.targets is empty"),
    (lambda c: c.train.__setitem__("trainable", "heads"), "train.trainable = 'heads': use one of all, "),
    (lambda c: c.train.__setitem__("trainable", "lora_and_heads"), "set model.lora.rank > 0"),
])
def test_bad_values_fail_with_one_clear_message(edit, message):
    cfg = get_config("tiny")
    edit(cfg)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_lora_config_is_valid():
    cfg = get_config("tiny")
    cfg.model.lora.update(rank=8, alpha=16.0, targets="query, value,up,down,proj,mean,logvar")
    cfg.train.trainable = "lora_and_heads"
    validate(cfg)


def test_wrong_type_is_named():
    cfg = get_config("tiny")
    # ConfigDict refuses a type change on assignment; a config loaded from JSON can still have one.
    cfg_dict = cfg.to_dict()
    cfg_dict["model"]["action_len"] = "eight"
    import ml_collections
    with pytest.raises(ConfigError, match="'model.action_len' = 'eight' has type str, expected int"):
        validate(ml_collections.ConfigDict(cfg_dict))


def test_legacy_defaults_fill_only_the_missing_fields():
    saved = {"variant": "tiny", "model": {"dnfm": {"layout": "per_setting", "temperature": 0.2}}}
    filled = with_legacy_defaults(saved)
    assert filled["model"]["dnfm"] == {"layout": "per_setting", "temperature": 0.2, "cross_attention": False,
                                       "constrained_decode": False}
    assert filled["model"]["bridge"]["connector_reads"] == "queries" and filled["model"]["action_head"] == "dnfm"
    assert "bridge" not in saved["model"]  # the input is left as it was
    empty = with_legacy_defaults({})
    for path, value in LEGACY_DEFAULTS.items():
        node = empty
        for key in path.split("."):
            node = node[key]
        assert node == value, path
