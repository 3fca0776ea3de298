"""End to end: the oracle scores perfectly and a random policy low on heldout samples; the model path
(featurize → compiled infer / encode → metrics, retrieval, latency) on random tiny params; the CLI."""

import json

import numpy as np
import pytest

from configs.vla_cabin import get_config
from tools import evaluate as cli
from vlacabin_jax.data import pipeline
from vlacabin_jax.eval import evaluate as E
from vlacabin_jax.train import restore

N = 300  # heldout VLA samples for the policy checks (≈0.6 s each)
# One worker runs this module: its model tests share the params and the compiled sampler.
pytestmark = pytest.mark.xdist_group("evaluate")


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def heldout(cfg):
    return E.eval_samples(cfg, N)


def test_eval_set_is_the_heldout_split(cfg):
    s = E.eval_samples(cfg, 3)
    t = E.eval_samples(cfg, 3, split="train")
    assert [x["sample_id"] & 0xFFFFFFFFFF for x in s] == [pipeline.HELDOUT_OFFSET + i for i in range(3)]
    assert [x["sample_id"] & 0xFFFFFFFFFF for x in t] == [0, 1, 2]
    assert all(x["kind"] == "vla" for x in s)
    assert {x["kind"] for x in E.eval_samples(cfg, 2, kind="speech_text")} == {"speech_text"}
    with pytest.raises(ValueError, match="split"):
        E.eval_samples(cfg, 1, split="test")


def test_oracle_scores_perfectly(cfg, heldout):
    r = E.evaluate_policy(E.oracle_policy(cfg), heldout, cfg)
    o = r["overall"]
    assert o["n"] == N and o["n_multi_turn"] > 20  # the set has follow-ups
    for k in ("success_rate", "clean_success_rate", "single_turn_success_rate", "multi_turn_success_rate",
              "scene_hit_rate", "step_completeness", "explanation_token_accuracy", "explanation_bleu"):
        assert o[k] == pytest.approx(1.0), k
    for k in ("over_trigger_rate", "under_trigger_rate", "inversion_rate", "conflict_rate", "violation_rate",
              "invalid_rate"):
        assert o[k] == 0.0, k
    assert r["failures"] == []
    assert all(m["success_rate"] == 1.0 for m in r["per_scene"].values())
    assert len(r["per_scene"]) > 30  # nearly every request type occurs


def test_random_policy_scores_low(cfg, heldout):
    r = E.evaluate_policy(E.random_policy(cfg, seed=0), heldout, cfg)
    o = r["overall"]
    assert o["success_rate"] < 0.2 and o["scene_hit_rate"] < 0.1 and o["step_completeness"] < 0.1
    assert o["over_trigger_rate"] > 0.4 and o["violation_rate"] > 0.03 and o["conflict_rate"] > 0.01
    assert o["explanation_bleu"] < 0.2 and o["explanation_token_accuracy"] < 0.3
    assert r["failures"] and all(f["issues"] for f in r["failures"])
    again = E.evaluate_policy(E.random_policy(cfg, seed=0), heldout[:50], cfg)["overall"]
    assert again == E.evaluate_policy(E.random_policy(cfg, seed=0), heldout[:50], cfg)["overall"]  # deterministic


# ---------------------------------------------------------------- the model (one compiled batch size)
B = 8


@pytest.fixture(scope="module")
def model(cfg):
    trainable, frozen = E.random_init(cfg, 0)
    vla = E.eval_samples(cfg, B)
    extra = E.eval_samples(cfg, 4, "video_text") + E.eval_samples(cfg, 4, "speech_text")
    return trainable, frozen, vla, extra


def test_evaluate_model_on_random_params(cfg, model):
    trainable, frozen, vla, extra = model
    r = E.evaluate_model(trainable, frozen, cfg, vla[:B - 2], batch_size=B, retrieval_samples=extra)
    o = r["overall"]
    assert o["n"] == B - 2  # the padded rows of the last batch are dropped
    for k, v in o.items():
        if k.endswith("_rate") or k in ("step_completeness", "explanation_token_accuracy"):
            assert v is None or 0.0 <= v <= 1.0, k
    assert o["explanation_token_accuracy"] is not None
    ret = r["retrieval"]
    assert ret["text-video/n"] == 4 and ret["speech-text/n"] >= 4 and ret["state-text/n"] >= 1
    for k, v in ret.items():
        if "/R@" in k and v is not None:
            assert 0.0 <= v <= 1.0
    # Untrained actions are random: whatever they are, they went through the simulator.
    preds, targets = E.predict_model(trainable, frozen, cfg, vla, batch_size=B)
    assert len(preds) == B and all(t is not None for t in targets)
    assert all(len(p.explanation) == cfg.model.explain_len for p in preds)


def test_latency_measures_compiled_warm_calls(cfg, model):
    trainable, frozen, vla, _ = model
    lat = E.latency(trainable, frozen, cfg, vla, batch_sizes=(B,), iters=3, warmup=1)
    b = lat[f"b{B}"]
    assert 0 < b["min_ms"] <= b["p50_ms"] <= b["p95_ms"] and b["iters"] == 3 and b["samples_per_s"] > 0
    assert lat["device"].startswith("cpu")


def test_checkpoint_restore_and_cli_on_it(cfg, model, tmp_path, capsys, monkeypatch):
    """A checkpoint written by the trainer's `Checkpointer`: params restored (newest step through the
    trainer's reader, an explicit step through the generic one), its saved config used, the CLI run."""
    import jax
    import jax.numpy as jnp

    from vlacabin_jax.train.checkpoint import Checkpointer

    trainable, frozen, _, _ = model
    ck_dir = tmp_path / "run" / "checkpoints"
    ckpt = Checkpointer(ck_dir, cfg, mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, data_hash="test")
    for step in (5, 7):
        # As the trainer's TrainState holds them: device arrays only.
        state = {"step": jnp.int32(step), "trainable": trainable, "frozen": frozen,
                 "opt_state": {"count": jnp.int32(step)}, "rng": jnp.zeros(2, jnp.uint32)}
        assert ckpt.save(step, state, {"next": step}, force=True)
        ckpt.wait()
    ckpt.close()
    assert restore.find_checkpoint_item(str(ck_dir)) == ck_dir / "7" / "state"
    same = lambda a, b: jax.tree.all(jax.tree.map(  # noqa: E731
        lambda x, y: np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)), a, b))
    for step in (None, 5):
        t2, f2 = restore.restore_params(str(ck_dir), cfg, step)
        assert same(trainable, t2) and same(frozen, f2)
    with pytest.raises(restore.RestoreError, match="do not match config 'small'"):
        restore.restore_params(str(ck_dir), get_config("small"))
    with pytest.raises(restore.RestoreError, match="step 3 not in"):
        restore.find_checkpoint_item(str(ck_dir), step=3)
    saved = restore.saved_config(ck_dir / "7" / "state")
    assert saved["variant"] == "tiny"
    resolved = restore.checkpoint_config(str(ck_dir), overrides=["--config.model.dnfm.sample_steps=2"])
    assert resolved.model.to_dict() == dict(cfg.model.to_dict(), dnfm=dict(cfg.model.dnfm.to_dict(), sample_steps=2))

    # The whole CLI on that checkpoint, at the batch size compiled above (no new compilation), with
    # the relative path a user types (Orbax itself refuses relative paths).
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["--checkpoint", "run/checkpoints", "--num-samples", str(B), "--batch-size", str(B),
                   "--retrieval-samples", "4", "--latency-iters", "0", "--out", "out"])
    out = tmp_path / "out"
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["overall"]["n"] == B and "retrieval" in res and res["meta"]["variant"] == "tiny"
    assert (out / "per_scene_success.png").stat().st_size > 0
    assert "success" in capsys.readouterr().out

    # A checkpoint saved before `model.dnfm.layout` existed was trained with the sequence layout:
    # its config reads back as that, not as today's per-setting preset.
    for config_file in (ck_dir / "7" / "config").iterdir():
        if config_file.is_file() and '"variant"' in config_file.read_text():
            old = json.loads(config_file.read_text())
            del old["model"]["dnfm"]["layout"]
            config_file.write_text(json.dumps(old))
    assert restore.checkpoint_config(str(ck_dir)).model.dnfm.layout == "sequence"
    assert restore.checkpoint_config(str(ck_dir), step=5).model.dnfm.layout == "per_setting"  # saved with it


# ---------------------------------------------------------------- CLI
def test_cli_oracle_and_compare(tmp_path, capsys):
    out = tmp_path / "oracle"
    assert cli.main(["--policy", "oracle", "--num-samples", "40", "--out", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["overall"]["success_rate"] == 1.0 and res["meta"]["split"] == "heldout"
    for png in ("per_scene_success.png", "confusion_oracle.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "cmp"
    assert cli.main(["--compare", "oracle", "random", "--num-samples", "40", "--out", str(out2)]) == 0
    cmp = json.loads((out2 / "compare.json").read_text())
    assert cmp["names"] == ["oracle", "random"]
    assert cmp["results"][0]["overall"]["success_rate"] > cmp["results"][1]["overall"]["success_rate"]
    text = capsys.readouterr().out
    assert "delta" in text and "over-trigger" in text


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--compare", "oracle", "/nonexistent/b"], "no such directory"),
    (["--policy", "oracle", "--config", "/nonexistent.py:tiny"], "no such file"),
    (["--policy", "oracle", "--config.model.nope=1"], "no config field"),
])
def test_cli_bad_paths_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(argv + ["--num-samples", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_empty_checkpoint_dir(tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path), "--num-samples", "2"]) == 2
    assert "no Orbax checkpoint" in capsys.readouterr().err
