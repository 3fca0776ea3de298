"""The per-setting DNFM layout (`model.dnfm.layout = "per_setting"`) through the export.

The mirror's decode (`torch_model.settings_to_sequence`) is `setting_layout.to_sequence` id for id
on random per-setting choices (none changed, a few, more than `length - 1`, all), its ONNX graph is
sort- and loop-free, and its tables are the JAX ones. A config written before the field (format
version 4) still reads as the sequence layout. End to end (a trained checkpoint of the layout
exports; JAX, the mirror and ONNX Runtime agree on the actions, the masked logits and the
43-position tensors) is tests/export/test_parity.py: tiny's default layout is "per_setting".
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import onnx
import pytest
import torch

from tests.export.conftest import variant_config
from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID, ActionVocabulary
from vlacabin_jax.export import convert, torch_model
from vlacabin_jax.model import dnfm, setting_layout

PER_SETTING = {"model.dnfm.layout": "per_setting"}


def _mirror_namespace():
    return torch_model.namespace(convert.mirror_config(variant_config("tiny", PER_SETTING), 2))


def random_settings(rows_per_rate: int, seed: int = 0) -> np.ndarray:
    """[n, 43] per-setting ids, each a value of its own path or `<pad>`, from every setting kept
    (nothing changes) through a few and more than 7 changed to every setting changed."""
    tables, rng = setting_layout.layout_tables(), np.random.default_rng(seed)
    allowed = [np.flatnonzero(row)[1:] for row in tables.value_mask]  # [1:]: all but <pad>
    rows = [[PAD_ID if rng.uniform() < keep else rng.choice(a) for a in allowed]
            for keep in (1.0, 0.97, 0.9, 0.8, 0.5, 0.0) for _ in range(rows_per_rate)]
    return np.asarray(rows, np.int32)


def test_mirror_tables_are_the_models():
    value_mask, rank = torch_model.setting_layout_tables(_mirror_namespace())
    tables = setting_layout.layout_tables()
    assert np.array_equal(value_mask.numpy(), tables.value_mask)
    assert np.array_equal(rank.numpy(), tables.decode_rank) and rank.dtype == torch.int32
    assert torch_model.num_positions(_mirror_namespace()) == setting_layout.num_positions(
        variant_config("tiny", PER_SETTING).model) == 43


@pytest.mark.parametrize("length", [2, 8, 16])  # action_len of tiny and base; 2 is the grammar's least
def test_settings_decode_matches_to_sequence(length):
    settings = random_settings(12)
    changed = (settings != PAD_ID).sum(-1)
    assert (changed == 0).any() and ((changed > 0) & (changed < 7)).any() and (changed > 7).any()
    tables = setting_layout.layout_tables()
    want = np.asarray(setting_layout.to_sequence(jnp.asarray(settings), length, tables))
    c = _mirror_namespace()
    got = torch_model.settings_to_sequence(torch.from_numpy(settings), torch_model.setting_layout_tables(c)[1],
                                           length, 43, ActionVocabulary().size).numpy()
    assert got.dtype == np.int32 and np.array_equal(got, want), np.argwhere(got != want)[:5]
    if length == 8:
        vocab = ActionVocabulary()
        nothing = changed == 0
        assert (got[nothing, :2] == [NOOP_ID, EOS_ID]).all() and (got[nothing, 2:] == PAD_ID).all()
        assert (got[changed > 7, 7] == EOS_ID).all()  # the first 7 in rank order, then <eos>
        for row in got:
            assert not cabin.inversions(vocab.decode(row))  # well formed, in the order the rules want


class _Decode(torch.nn.Module):
    """Masked logits → actions, as the mirror's per-setting decode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rank", torch_model.setting_layout_tables(_mirror_namespace())[1])

    def forward(self, logits):
        settings = torch.argmax(logits, dim=-1).to(torch.int32)
        return torch_model.settings_to_sequence(settings, self.rank, 8, 43, 181)


def masked_logits(batch: int, seed: int = 0) -> np.ndarray:
    """Random logits [batch, 43, 181] under the value mask, `<pad>` ("keep") raised in some rows
    so that every count of changes occurs, row 0 with nothing changed."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 43, 181)).astype(np.float32)
    x[:, :, PAD_ID] += np.linspace(10.0, -3.0, batch)[:, None]
    return np.where(setting_layout.layout_tables().value_mask, x, np.finfo(np.float32).min)


def test_settings_decode_onnx_is_straight_line(tmp_path):
    """No Loop/If/Scan, no sort (TopK) and no boolean indexing in the graph; ONNX Runtime at
    another batch size gives `dnfm.decode_actions`' ids."""
    from vlacabin_jax.export.onnx_export import ort_session

    logits = masked_logits(16)
    path = tmp_path / "decode.onnx"
    torch.onnx.export(_Decode(), (torch.from_numpy(logits[:2]),), str(path), dynamo=False, opset_version=18,
                      input_names=["logits"], output_names=["ids"], dynamic_axes={"logits": {0: "b"}, "ids": {0: "b"}})
    onnx.checker.check_model(str(path), full_check=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "If", "Scan", "NonZero", "Compress", "SequenceMap", "TopK"}, ops
    got = ort_session(path).run(None, {"logits": logits})[0]
    want = np.asarray(dnfm.decode_actions(jnp.asarray(logits), variant_config("tiny", PER_SETTING).model))
    changed = (np.argmax(logits, -1) != PAD_ID).sum(-1)
    assert changed[0] == 0 and changed.max() > 7
    assert got.dtype == np.int32 and np.array_equal(got, want)


def test_a_config_without_the_layout_reads_as_sequence():
    """config.json of format version 4 has no `model.dnfm.layout`: the mirror builds the sequence
    layout (action_len positions); per_setting without its tables is refused in one line."""
    config = convert.mirror_config(variant_config("tiny"), 2)
    del config["model"]["dnfm"]["layout"]
    config["format_version"] = 4
    with torch.device("meta"):
        mirror = torch_model.VLACabinMirror(config)
    assert tuple(mirror.dnfm.position_embedding.shape) == (8, 64) and not mirror.dnfm.per_setting
    assert torch_model.io_spec(config)["outputs"]["x1"]["shape"] == ["batch", 8, 32]
    broken = convert.mirror_config(variant_config("tiny", PER_SETTING), 2)
    del broken["setting_layout"]
    with pytest.raises(ValueError, match="needs config.json's \"setting_layout\"") as e:
        torch_model.check_config(broken)
    assert "\n" not in str(e.value)
