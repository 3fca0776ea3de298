"""Reading a checkpoint's saved config (`export.source.config_from_json`) and the mirror's format check."""
import json

import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.export import torch_model
from vlacabin_jax.export.source import ExportInputError, config_from_json


def saved_config(variant: str = "tiny") -> dict:
    return json.loads(get_config(variant).to_json())


def test_saved_values_win_over_the_preset():
    saved = saved_config()
    saved["model"]["dnfm"]["temperature"] = 0.25
    assert config_from_json(saved).model.dnfm.temperature == 0.25


def test_a_field_added_later_takes_the_value_that_reproduces_the_checkpoint():
    saved = saved_config()
    assert saved["model"]["bridge"]["connector_reads"] == "all"  # the tiny preset today
    assert config_from_json(saved).model.bridge.connector_reads == "all"
    del saved["model"]["bridge"]["connector_reads"]  # a checkpoint written before the field existed
    assert config_from_json(saved).model.bridge.connector_reads == "queries"


def test_unknown_field_is_refused():
    saved = saved_config()
    saved["model"]["bridge"]["mystery"] = 1
    with pytest.raises(ExportInputError, match="model.bridge.mystery, which this code does not know"):
        config_from_json(saved)


def test_mirror_refuses_an_older_export_format():
    # Version 4 (no `model.dnfm.layout`) is still read, as the sequence layout; older ones are not.
    config = {"format": torch_model.FORMAT, "format_version": min(torch_model.READABLE_VERSIONS) - 1, "steps": 4}
    with pytest.raises(ValueError, match="export the checkpoint again with this code"):
        torch_model.check_config(config)


def test_fields_added_later_take_their_legacy_values():
    """A checkpoint saved before a route switch existed was trained without that route."""
    from vlacabin_jax.config import LEGACY_DEFAULTS

    saved = saved_config()
    for path in LEGACY_DEFAULTS:
        *parents, leaf = path.split(".")
        node = saved
        for key in parents:
            node = node[key]
        del node[leaf]
    cfg = config_from_json(saved)
    for path, value in LEGACY_DEFAULTS.items():
        node = cfg
        for key in path.split("."):
            node = node[key]
        assert node == value, path
    current = config_from_json(saved_config())  # saved fields keep their values (tiny: every route on)
    assert current.model.video.patch_tokens and current.model.dnfm.cross_attention
    assert current.model.state.numeric_fourier == 6 and current.model.dnfm.constrained_decode


def test_an_autoregressive_action_head_is_not_exportable():
    from vlacabin_jax.export.source import check_exportable

    cfg = get_config("tiny")
    check_exportable(cfg)
    cfg.model.action_head = "autoregressive"
    with pytest.raises(ExportInputError, match=r"^model\.action_head = 'autoregressive' is not exported"):
        check_exportable(cfg)
