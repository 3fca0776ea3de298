"""The batch contract between the data pipeline and the model.

Every batch the model sees is a flat dict of fixed-shape numpy/JAX arrays with exactly these keys.
Missing modalities are signalled by `modality_mask` (and the per-element masks), never by
zero-filled features alone. Shapes are derived from the config so that data and model agree.
"""

from __future__ import annotations

import numpy as np

# Order of the modality axis of `modality_mask` and of the latent tokens in the bridge.
MODALITIES = ("speech", "text", "video", "state")

# The four data kinds of the pre-training mix; `kind` holds the index.
KINDS = ("vla", "image_text", "video_text", "speech_text")

# Preference pairs (the `align` stage): a VLA turn with a chosen and a rejected answer, from the
# synthetic world (`preference`) or sampled from a policy and scored in the cabin simulator
# (`preference_sim`, `data.preference_dir`). Their samples are VLA turns (`kind` = "vla");
# these names exist only in `data.mixture`.
PREFERENCE_KINDS = ("preference", "preference_sim")
MIX_KINDS = KINDS + PREFERENCE_KINDS

# Batch fields that are host-side bookkeeping, never sent to the device (int64 ids do not fit int32 JAX).
HOST_ONLY_FIELDS = ("sample_id",)

# Frames are uint8 RGB [0, 255] everywhere on the host (render, records, featurize, batches) and
# in the exported graphs; `frames_unit` is the one scaling to [0, 1], done where the model reads them.
FRAMES_DTYPE = np.uint8
_INV_255 = np.float32(1.0 / 255.0)


def frames_dtype_error(dtype) -> str:
    """The one-line refusal of frames that are not uint8 (featurize, the model's scaling)."""
    return (f"frames are {dtype}, expected uint8 RGB in [0, 255] (the batch contract; convert float "
            f"frames in [0, 1] with np.round(x * 255).astype(np.uint8))")


def frames_unit(frames):
    """uint8 frames [0, 255] -> float32 in [0, 1]: float32(x) * float32(1 / 255), numpy or JAX
    (bit-identical to what the host pipeline computed before frames crossed as uint8).

    Raises TypeError for anything but uint8 (float frames would be silently scaled twice or not at
    all)."""
    if frames.dtype != FRAMES_DTYPE:
        raise TypeError(frames_dtype_error(frames.dtype))
    return frames.astype(np.float32) * _INV_255


def batch_spec(cfg, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every batch field.

    Args:
      cfg: the full config (`cfg.model` and `cfg.data` are read).
      batch_size: leading dimension (global or per-process, as the caller needs).
    Returns:
      {name: (shape, dtype)}.
    """
    m, d = cfg.model, cfg.data
    b = batch_size
    size = m.vit.image_size
    return {
        # Instruction / caption / transcript text, token ids of the text tokenizer.
        "text_tokens": ((b, d.text_len), np.int32),
        "text_mask": ((b, d.text_len), np.bool_),
        # Log-mel features of the spoken request.
        "mel": ((b, d.mel_frames, m.speech.n_mels), np.float32),
        "mel_mask": ((b, d.mel_frames), np.bool_),
        # Cabin video frames (an image is a one-frame clip), raw RGB bytes uint8 in [0, 255]: they
        # cross host -> device as bytes (a quarter of float32's), the model scales them
        # (`frames_unit`, in `VLACabin.frame_features`).
        "frames": ((b, d.num_frames, size, size, 3), FRAMES_DTYPE),
        "frame_mask": ((b, d.num_frames), np.bool_),
        # Device / environment state: normalised numeric fields and categorical ids.
        "state_numeric": ((b, m.state.numeric_dim), np.float32),
        "state_categorical": ((b, len(m.state.categorical_sizes)), np.int32),
        # Which modalities are present in each sample, in MODALITIES order.
        "modality_mask": ((b, len(MODALITIES)), np.bool_),
        # Active cabin constraint tags (multi-hot over the tag vocabulary).
        "constraint_tags": ((b, m.bridge.n_constraint_tags), np.bool_),
        # What the cabin did in the latest earlier turn of the dialogue (its own action log; the
        # text of that turn is in `text_tokens`): the action ids it executed, in order, then
        # <eos>, then <pad>; [<noop>, <eos>, <pad>...] when it did nothing; all <pad> when there
        # is no earlier turn (and for every kind but VLA turns).
        "history_actions": ((b, m.action_len), np.int32),
        # Aligned with `history_actions` position by position: the token `path=value` of the
        # value each executed token's path had before that turn (what an undo restores); <noop>
        # under a <noop>; <pad> elsewhere, <eos> position included.
        "history_before": ((b, m.action_len), np.int32),
        # Target action tokens: actions, <eos>, then <pad> to action_len.
        "action_tokens": ((b, m.action_len), np.int32),
        # Whether the sample carries an action target to imitate (VLA kind; not preference pairs).
        "has_actions": ((b,), np.bool_),
        # Preference pairs: `action_tokens` holds the chosen answer, this the rejected one (same
        # layout); `has_pair` marks the rows that are pairs (zeros / False elsewhere).
        "rejected_tokens": ((b, m.action_len), np.int32),
        "has_pair": ((b,), np.bool_),
        # Explanation tokens (<bos> ... <eos> <pad>...) and their mask.
        "explanation_tokens": ((b, m.explain_len), np.int32),
        "explanation_mask": ((b, m.explain_len), np.bool_),
        # Data kind (index into KINDS) and a globally unique sample id.
        "kind": ((b,), np.int32),
        "sample_id": ((b,), np.int64),
    }


def transfer_bytes(cfg, batch_size: int) -> dict[str, int]:
    """Bytes per field of one batch of `batch_size` rows as it crosses host -> device (every
    `batch_spec` field but `HOST_ONLY_FIELDS`); `python -m tools.data_bench --bytes` prints them."""
    return {k: int(np.prod(shape)) * np.dtype(dtype).itemsize
            for k, (shape, dtype) in batch_spec(cfg, batch_size).items() if k not in HOST_ONLY_FIELDS}


def zeros_batch(cfg, batch_size: int) -> dict[str, np.ndarray]:
    """An all-zero batch of the right shapes (for `init` and shape inference)."""
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_spec(cfg, batch_size).items()}
