"""Shared fixtures of the model tests: the tiny config and random batches of the batch contract."""
import numpy as np
import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.data.actions import EOS_ID, PAD_ID
from vlacabin_jax.data.spec import batch_spec


def random_batch(cfg, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every modality present, distinct random inputs and targets per sample."""
    rng = np.random.default_rng(seed)
    m = cfg.model
    batch = {}
    for key, (shape, dtype) in batch_spec(cfg, batch_size).items():
        if dtype == np.bool_:
            batch[key] = np.ones(shape, bool)
        elif key == "frames":
            batch[key] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif dtype == np.float32:
            batch[key] = rng.normal(size=shape).astype(np.float32)
        else:
            batch[key] = np.zeros(shape, dtype)
    batch["text_tokens"] = rng.integers(5, m.lm.vocab_size, size=batch["text_tokens"].shape).astype(np.int32)
    batch["text_mask"][:, -4:] = False  # some padding
    batch["state_categorical"] = np.stack(
        [rng.integers(0, n, size=batch_size) for n in m.state.categorical_sizes], -1).astype(np.int32)
    batch["constraint_tags"] = rng.uniform(size=batch["constraint_tags"].shape) < 0.3
    # Well-formed targets (device tokens, <eos>, <pad>): the decode obeys the action grammar.
    tokens = rng.integers(3, m.dnfm.vocab_size, size=batch["action_tokens"].shape).astype(np.int32)
    length = rng.integers(1, m.action_len, size=(batch_size, 1))
    pos = np.arange(m.action_len)[None]
    batch["action_tokens"] = np.where(pos < length, tokens, np.where(pos == length, EOS_ID, PAD_ID)).astype(np.int32)
    # An action log on every other row (what an earlier turn executed and the values it replaced).
    logged = (np.arange(batch_size)[:, None] % 2 == 0) & (pos < 2)
    batch["history_actions"] = np.where(logged, rng.integers(3, m.dnfm.vocab_size, size=tokens.shape), 0).astype(np.int32)
    batch["history_before"] = np.where(logged, rng.integers(3, m.dnfm.vocab_size, size=tokens.shape), 0).astype(np.int32)
    batch["explanation_tokens"] = rng.integers(5, m.lm.vocab_size, size=batch["explanation_tokens"].shape).astype(np.int32)
    batch["explanation_tokens"][:, 0] = m.text_bos_id
    batch["kind"][:] = 0
    batch["sample_id"] = np.arange(batch_size, dtype=np.int64)
    return batch


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny")
