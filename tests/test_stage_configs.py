"""The stage configs of DESIGN §3 validate, and alignment settings are refused outside `align`."""
import re

import pytest

from configs.stages import align, pretrain, sft
from vlacabin_jax.config import ConfigError, validate


def _align(tmp_path=None):
    c = align.get_config("tiny")
    c.train.init_from = "runs/sft/checkpoints"
    return c


def test_stage_configs_validate_and_differ_where_the_design_says():
    p, s, a = pretrain.get_config("tiny"), sft.get_config("tiny"), _align()
    for c in (p, s, a):
        validate(c)
    assert p.loss.source_weight == 0 and s.loss.source_weight == 1 and p.data.mixture.count("=") == 4
    assert s.data.mixture == "vla=1" and s.train.trainable == "all_and_anchor"  # tiny imports no anchor
    assert sft.get_config("small").train.trainable == "all"
    assert a.train.trainable == "lora_and_heads" and a.model.lora.rank > 0 and a.loss.dpo_weight > 0
    assert "preference=" in a.data.mixture


@pytest.mark.parametrize("make, edit, message", [
    (_align, lambda c: c.train.__setitem__("init_from", ""), "train.stage = 'align' needs train.init_from"),
    (_align, lambda c: c.loss.__setitem__("dpo_beta", 0.0), "loss.dpo_beta = 0.0 must be > 0"),
    (_align, lambda c: c.data.__setitem__("mixture", "vla=1"), "has no preference pairs"),
    (_align, lambda c: c.data.__setitem__("mixture", "preference=1,preference_sim=1"),
     "data.preference_dir = '' holds no manifest.json"),
    (_align, lambda c: c.data.__setitem__("preference_dir", "/tmp"), "preference_dir = '/tmp' is set but"),
    (_align, lambda c: c.data.__setitem__("mixture", "preference=x"), "is not kind=weight"),
    (lambda: sft.get_config("tiny"), lambda c: c.loss.__setitem__("dpo_weight", 1.0), "only train.stage = 'align' keeps"),
    (lambda: sft.get_config("tiny"), lambda c: c.data.__setitem__("mixture", "vla=1,preference=1"),
     "reads preference pairs (preference) but train.stage = 'sft'"),
])
def test_alignment_settings_fail_with_one_clear_message(make, edit, message):
    cfg = make()
    edit(cfg)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)
