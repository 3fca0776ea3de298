"""The quality ladder: rung configs, the score of a policy, the plain baselines end to end, the CLI."""
import json

import jax
import numpy as np
import pytest

from configs.stages.sft import get_config
from tools import quality_ladder
from vlacabin_jax.data.actions import NOOP
from vlacabin_jax.eval import evaluate, feature_baseline, ladder
from vlacabin_jax.eval.metrics import Prediction
from vlacabin_jax.model import ar_head


@pytest.fixture(scope="module")
def samples():
    return evaluate.eval_samples(get_config("tiny"), 120)


def test_rung_configs_set_their_fields_and_leave_the_base_alone():
    cfg = get_config("tiny")
    before = cfg.to_dict()
    seed = ladder.rung_config(cfg, "seed")
    assert (seed.model.state.field_tokens, seed.model.video.patch_tokens, seed.train.trainable) == (False, False, "all")
    assert seed.model.dnfm.layout == "sequence" and ladder.rung_config(cfg, "seed+per_setting").model.dnfm.layout == "per_setting"
    one = ladder.rung_config(cfg, "seed+state")
    assert one.model.state.field_tokens and one.model.state.numeric_fourier == 6 and not one.model.video.patch_tokens
    full = ladder.rung_config(cfg, "full")  # every fix, whatever the stage config says
    assert full.train.trainable == "all_and_anchor" and full.model.dnfm.cross_attention and full.model.state.field_tokens
    assert full.model.dnfm.layout == "per_setting" and full.loss.keep_weight == 0.3
    sequence = ladder.rung_config(cfg, "full_sequence")  # every other fix kept
    assert sequence.model.dnfm.layout == "sequence" and sequence.loss.keep_weight == 1.0
    assert sequence.model.dnfm.cross_attention and sequence.train.trainable == "all_and_anchor"
    ar = ladder.rung_config(cfg, "full_ar")
    assert ar.model.action_head == "autoregressive" and ar.loss.source_weight == 0.0
    assert ar.model.dnfm.layout == "sequence"  # no 43 unused DNFM positions beside the head
    assert cfg.to_dict() == before
    with pytest.raises(KeyError, match="unknown rung"):
        ladder.rung_config(cfg, "nope")


def test_score_counts_success_exact_match_and_groups(samples):
    oracle = [Prediction(tuple(s["actions"])) for s in samples]
    got = ladder.score(oracle, samples)
    assert got["success_rate"] == got["exact_match"] == 1.0 and got["invalid_rate"] == 0.0
    noop = ladder.score([Prediction((NOOP,)) for _ in samples], samples)
    n_noop = sum(tuple(s["actions"]) == (NOOP,) for s in samples)
    assert noop["per_group"]["noop"]["success_rate"] == 1.0 and noop["per_group"]["noop"]["n"] == n_noop
    assert noop["per_group"]["single"]["exact_match"] == 0.0
    assert sum(g["n"] for g in noop["per_group"].values()) == len(samples)
    modes = noop["per_mode"]
    assert set(modes) == set(ladder.MODES) and sum(m["n"] for m in modes.values()) == len(samples)
    assert modes["spoken_only"]["n"] == sum(s["mel"] is not None and not s["text"] for s in samples) > 0
    assert modes["typed"]["n"] == sum(s["mel"] is None for s in samples) > 0
    chat = noop["per_request"]["chitchat"]  # always <noop>: answering <noop> gets every one
    assert chat["n"] > 0 and chat["success_rate"] == 1.0
    assert sum(r["n"] for r in noop["per_request"].values()) == len(samples)
    broken = ladder.score([Prediction((), error="<eos> before any action")] * len(samples), samples)
    assert broken["invalid_rate"] == 1.0 and broken["success_rate"] == 0.0


def test_plain_rungs_train_and_write_their_table(tmp_path, capsys):
    out = tmp_path / "ladder"
    rc = quality_ladder.main(["--config", "configs/stages/sft.py:tiny", "--steps", "3",
                              "--rungs", "features,transformer,transformer_ar", "--num-samples", "16",
                              "--curve-every", "3", "--curve-samples", "8", "--out", str(out),
                              "--config.train.global_batch_size=8"])
    assert rc == 0
    result = json.loads((out / "ladder.json").read_text())
    assert [row["name"] for row in result["rungs"]] == ["features", "transformer", "transformer_ar"]
    for row in result["rungs"]:
        assert row["params"] > 0 and [c["step"] for c in row["curve"]] == [3]
        assert 0.0 <= row["by_k"]["-"]["success_rate"] <= 1.0 and row["by_k"]["-"]["invalid_rate"] == 0.0
    assert (out / "ladder.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "rung features" in printed and "rung transformer" in printed and "rung transformer_ar" in printed


def test_token_transformer_reads_state_and_text_but_no_perception(samples):
    cfg = get_config("tiny")
    batch, _ = next(evaluate.batches(samples[:4], cfg, 4))
    net = feature_baseline.TokenTransformer(cfg)
    params = net.init(jax.random.key(0), batch)["params"]
    logits = net.apply({"params": params}, batch)
    assert logits.shape == (4, cfg.model.action_len, cfg.model.dnfm.vocab_size)
    blind = dict(batch, frames=np.zeros_like(batch["frames"]), mel=np.zeros_like(batch["mel"]))
    np.testing.assert_array_equal(net.apply({"params": params}, blind), logits)
    for field, value in (("state_numeric", 0.5), ("text_tokens", 7)):
        changed = dict(batch, **{field: np.full_like(batch[field], value)})
        assert np.abs(np.asarray(net.apply({"params": params}, changed)) - np.asarray(logits)).max() > 1e-4, field


def test_autoregressive_transformer_reads_only_earlier_actions(samples):
    cfg = get_config("tiny")
    batch, _ = next(evaluate.batches(samples[:4], cfg, 4))
    net = feature_baseline.TokenTransformer(cfg, causal_actions=True)
    length, vocab = cfg.model.action_len, cfg.model.dnfm.vocab_size
    previous = np.random.default_rng(0).integers(3, vocab, (4, length)).astype(np.int32)
    params = net.init(jax.random.key(0), batch, previous)["params"]
    logits = np.asarray(net.apply({"params": params}, batch, previous))
    assert logits.shape == (4, length, vocab)
    changed = previous.copy()
    changed[:, 3] = (changed[:, 3] + 1) % vocab  # the action before slot 3
    moved = np.abs(np.asarray(net.apply({"params": params}, batch, changed)) - logits).max(axis=(0, 2))
    assert (moved[:3] == 0).all() and (moved[3:] > 1e-4).all(), moved
    # Teacher forcing: without previous_actions the slots read START and the targets shifted right.
    forced = np.asarray(net.apply({"params": params}, batch))
    np.testing.assert_array_equal(forced, np.asarray(net.apply({"params": params}, batch, ar_head.teacher_inputs(
        batch["action_tokens"]))))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be positive"),
    (["--steps", "5", "--rungs", "bogus"], "unknown rung"),
    (["--steps", "5", "--ks", "9"], "sampler steps in 1..8"),
    (["--steps", "5", "--typo"], "unrecognized arguments"),
    (["--steps", "5", "--rungs", "transformer,full", "--config.model.bridge.connector_skip=False"],
     "rung 'full' sets this field itself"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        quality_ladder.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_override_conflicts_name_the_rung_and_field_only_where_a_rung_sets_it():
    assert ladder.override_conflicts(["full", "transformer"], ["--config.model.dnfm.cross_attention=False",
                                                               "--config.loss.explanation_weight=0"]) == [
        ("full", "model.dnfm.cross_attention")]
    assert ladder.override_conflicts(["transformer", "full_ar"], ["--config.loss.kl_weight=0"]) == []
    assert ladder.override_conflicts(["full_ar"], ["--config.loss.velocity_weight=1"]) == [
        ("full_ar", "loss.velocity_weight")]


def test_a_bad_config_override_is_one_error_line(tmp_path, capsys):
    assert quality_ladder.main(["--steps", "5", "--out", str(tmp_path), "--config.model.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config field model.nope" in err[0]
