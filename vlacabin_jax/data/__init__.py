"""Cabin data: action vocabulary, synthetic cabin world, shards and the grain pipeline."""

import functools
import os


@functools.lru_cache(maxsize=1)
def schema_sizes() -> dict:
    """Sizes the model config takes from the data schemas.

    Computed from the action schema (`actions.py`), the cabin state features and constraint tags
    (`cabin.py`) and the packaged tokenizer (its size read with `tokenizers`, not `transformers`,
    so importing a config stays light).

    Returns:
      {"text_vocab": int, "action_vocab": int, "state_numeric": int,
       "state_categorical": tuple[int, ...], "constraint_tags": int}
    """
    from tokenizers import Tokenizer

    from vlacabin_jax.data import cabin
    from vlacabin_jax.data.actions import ActionVocabulary

    path = os.path.join(os.path.dirname(__file__), "tokenizer", "tokenizer.json")
    return {
        "text_vocab": Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True),
        "action_vocab": ActionVocabulary().size,
        "state_numeric": len(cabin.STATE_NUMERIC_FIELDS),
        "state_categorical": tuple(n for _, n in cabin.STATE_CATEGORICAL_FIELDS),
        "constraint_tags": len(cabin.CONSTRAINT_TAGS),
    }
