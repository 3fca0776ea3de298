"""Cabin data: action vocabulary, synthetic cabin world, shards and the grain pipeline."""


def schema_sizes() -> dict:
    """Sizes the model config takes from the data schemas.

    Returns:
      {"text_vocab": int, "action_vocab": int, "state_numeric": int,
       "state_categorical": tuple[int, ...], "constraint_tags": int}
    """
    # Provisional numbers until the schemas land (the data issue replaces this body).
    return {
        "text_vocab": 512,
        "action_vocab": 128,
        "state_numeric": 12,
        "state_categorical": (4, 4, 6, 3),
        "constraint_tags": 10,
    }
