"""Preference pairs on the data side: pair shards, the `preference` / `preference_sim` mixture kinds."""

import numpy as np
import pytest

from configs.stages.align import get_config as align_config
from vlacabin_jax.data import features, pipeline, preferences, records, world
from vlacabin_jax.data.actions import ActionVocabulary

TINY = dict(image_size=32, num_frames=4, n_mels=32, mel_frames=32)


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [dict(world.preference_pair(7, start + i, **TINY), chosen_reward=1.0, rejected_reward=0.0)
            for i in range(n)]


def test_pair_shards_round_trip_and_refuse_bad_records(tmp_path):
    pairs = _pairs(5)
    manifest = preferences.write_pairs(tmp_path / "p", {"train": pairs}, {"source": "test"}, records_per_shard=2)
    assert manifest["counts"] == {"train": 5, "heldout": 0} and len(manifest["shards"]) == 3
    _, src = preferences.open_pairs(tmp_path / "p", "train")
    assert len(src) == 5 and src[3]["rejected"] == pairs[3]["rejected"] and src[3]["chosen_reward"] == 1.0
    assert len(preferences.open_pairs(tmp_path / "p", "heldout")[1]) == 0
    with pytest.raises(FileExistsError):
        preferences.write_pairs(tmp_path / "p", {"train": pairs}, {})
    with pytest.raises(records.CorruptRecord, match="'rejected'"):
        preferences.write_pairs(tmp_path / "q", {"train": [dict(pairs[0], rejected=[])]}, {})


def test_align_mixture_gives_pair_rows_with_both_answers(tmp_path):
    preferences.write_pairs(tmp_path / "p", {"train": _pairs(4, 100)}, {"source": "test"})
    cfg = align_config("tiny")
    cfg.data.preference_dir = str(tmp_path / "p")
    cfg.data.mixture = "preference=1,preference_sim=1,vla=1"
    it = pipeline.make_dataset(cfg, global_batch_size=12, seed=0)
    batch = next(it)
    vocab = ActionVocabulary()
    pair_rows = np.flatnonzero(batch["has_pair"])
    assert 0 < len(pair_rows) < 12 and not batch["has_actions"][pair_rows].any()
    assert batch["has_actions"][~batch["has_pair"]].all()
    assert all(vocab.decode(batch["rejected_tokens"][r]) != vocab.decode(batch["action_tokens"][r]) for r in pair_rows)
    assert (batch["rejected_tokens"][~batch["has_pair"]] == 0).all()
    assert set(it.get_state()["stream"]["mixture"]) == {"vla", "image_text", "video_text", "speech_text",
                                                        "preference", "preference_sim"}
    f = features.featurize_pair(world.preference_pair(0, 5, **TINY), cfg, features.load_tokenizer(), vocab)
    assert f["has_pair"] and not f["has_actions"]
    assert pipeline.dataset_hash(cfg) != pipeline.dataset_hash(align_config("tiny"))  # the pairs are data too
