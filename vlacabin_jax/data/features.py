"""Sample dict (from `world.generate` or a shard) → the fixed-shape arrays of `spec.batch_spec`.

Layout decisions:
- text: earlier turns, oldest first, each followed by `<sep>`, then the current text; when that is
  longer than `text_len`, the oldest history tokens go first (the current request matters most),
  then the end of the current text. A spoken-only turn with history ends in `<sep>`. No
  `<bos>`/`<eos>` in the text.
- actions: the tokens, `<eos>`, then `<pad>`. A sequence longer than `action_len - 1` raises
  `ValueError` instead of being cut (a cut sequence would be a different, wrong answer). The
  generator never emits more than `cabin.MAX_ACTIONS` = 7, which fits every config variant.
- earlier turn's action log (`history_actions`, `history_before`): the executed tokens of the
  sample's `history_actions` pairs, `<eos>`, `<pad>` (the layout of `action_tokens`), and under
  each executed token the id of its before-token (`<noop>` under `<noop>`, `<pad>` under `<eos>`
  and after). A sample without the field (old shards, logs without it) has the empty log: all
  `<pad>`. A log longer than `action_len - 1` raises `ValueError`, like actions.
- explanation: `<bos> … <eos>` then `<pad>`; the mask covers `<bos>` through `<eos>`. An
  explanation longer than `explain_len` keeps its first `explain_len` tokens without `<eos>`
  (the generator's explanations fit the tiny variant's 24).
- preference pairs (a sample with `chosen` and `rejected`): `action_tokens` holds the chosen answer,
  `rejected_tokens` the rejected one (same layout), `has_pair` True and `has_actions` False; every
  other sample has zero `rejected_tokens` and `has_pair` False.
- frames: uint8 RGB [0, 255] as rendered / stored, padded with zeros; never scaled here (the model
  scales them on device, `spec.frames_unit`). Float frames raise `ValueError` (one line).
- text ids: `<pad>`/`<bos>`/`<eos>` are the model's ids (`cfg.model.text_*_id`); `<sep>` is the
  tokenizer's sep token (its eos when it has none).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from vlacabin_jax.data import spec
from vlacabin_jax.data.actions import NOOP, ActionVocabulary, InvalidActionSequence, split_token
from vlacabin_jax.data.cabin import CONSTRAINT_TAGS

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "tokenizer")
_TAG_INDEX = {t: i for i, t in enumerate(CONSTRAINT_TAGS)}


def _transformers_tokenizers():
    """(AutoTokenizer, PreTrainedTokenizerFast), imported without transformers' "PyTorch was not
    found" advisory: tokenizers need no torch, and the banner reads like an error on every launch."""
    previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # read when the advisory is logged
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    finally:
        if previous is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
    return AutoTokenizer, PreTrainedTokenizerFast


@functools.lru_cache(maxsize=8)
def load_tokenizer(path_or_none: str | None = None):
    """The text tokenizer as a `transformers` fast tokenizer.

    Args:
      path_or_none: None loads the tiny/small tokenizer shipped in this package (`<pad>`=0,
        `<bos>`=1, `<eos>`=2, `<unk>`=3, `<sep>`=4); a directory (e.g. the anchor LM's checkpoint
        directory, with tokenizer.json and usually tokenizer_config.json) loads that tokenizer as
        its own config describes it.
    """
    AutoTokenizer, PreTrainedTokenizerFast = _transformers_tokenizers()
    if path_or_none is None:
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(TOKENIZER_DIR, "tokenizer.json"),
                                       pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                       unk_token="<unk>", sep_token="<sep>")
    path = str(path_or_none)
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(path)
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (the `tokenizers` fast path when available)."""
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def sep_id(tokenizer, cfg) -> int:
    """The id that ends each earlier turn in `text_tokens` (the tokenizer's sep, else its eos)."""
    sep = getattr(tokenizer, "sep_token_id", None)
    return int(sep) if sep is not None else int(cfg.model.text_eos_id)


def _pad_to(x: np.ndarray, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad the leading axis of `x` to n; (padded, mask[n])."""
    t = x.shape[0]
    if t > n:
        raise ValueError(f"{what} has {t} steps, more than the config's {n}")
    out = np.zeros((n,) + x.shape[1:], x.dtype)
    out[:t] = x
    mask = np.zeros((n,), np.bool_)
    mask[:t] = True
    return out, mask


def featurize(sample: dict, cfg, tokenizer, vocab: ActionVocabulary) -> dict[str, np.ndarray]:
    """One sample → {name: array} with exactly the keys, shapes (minus the batch axis) and dtypes
    of `spec.batch_spec(cfg, ·)`.

    Raises:
      ValueError: a modality's shape disagrees with the config (image size, n_mels, state widths,
        tag vocabulary), an input is longer than its slot (mel, frames), frames are not uint8, the
        action sequence or the earlier turn's action log does not fit `action_len - 1`, or the log
        is malformed.
        `actions.InvalidActionSequence` for malformed action tokens (target or log).
    """
    m, d = cfg.model, cfg.data
    shapes = spec.batch_spec(cfg, 1)
    out: dict[str, np.ndarray] = {}

    # Text: history <sep> ... <sep> current; history is cut first (oldest tokens), then the end of
    # the current text.
    sep = sep_id(tokenizer, cfg)
    hist: list[int] = []
    for turn in sample.get("history") or []:
        hist += encode_text(tokenizer, turn) + [sep]
    cur = encode_text(tokenizer, sample.get("text") or "")[:d.text_len]
    room = d.text_len - len(cur)
    ids = (hist[-room:] if room > 0 and hist else []) + cur
    out["text_tokens"] = np.full((d.text_len,), m.text_pad_id, np.int32)
    out["text_tokens"][:len(ids)] = ids
    out["text_mask"] = np.arange(d.text_len) < len(ids)

    mel = sample.get("mel")
    if mel is not None and len(mel):
        mel = np.asarray(mel, np.float32)
        if mel.ndim != 2 or mel.shape[1] != m.speech.n_mels:
            raise ValueError(f"mel shape {mel.shape} does not match n_mels={m.speech.n_mels}")
        out["mel"], out["mel_mask"] = _pad_to(mel, d.mel_frames, "mel")
    else:
        mel = None
        out["mel"] = np.zeros(shapes["mel"][0][1:], np.float32)
        out["mel_mask"] = np.zeros((d.mel_frames,), np.bool_)

    frames = sample.get("frames")
    size = m.vit.image_size
    if frames is not None and len(frames):
        frames = np.asarray(frames)
        if frames.shape[1:] != (size, size, 3):
            raise ValueError(f"frames shape {frames.shape} does not match image_size={size}")
        if frames.dtype != spec.FRAMES_DTYPE:  # records only ever held uint8; the model scales them
            raise ValueError(spec.frames_dtype_error(frames.dtype))
        out["frames"], out["frame_mask"] = _pad_to(frames, d.num_frames, "frames")
    else:
        frames = None
        out["frames"] = np.zeros(shapes["frames"][0][1:], spec.FRAMES_DTYPE)
        out["frame_mask"] = np.zeros((d.num_frames,), np.bool_)

    num, cat = sample.get("state_numeric"), sample.get("state_categorical")
    if num is not None:
        num = np.asarray(num, np.float32)
        cat = np.asarray(cat, np.int32)
        if num.shape != (m.state.numeric_dim,) or cat.shape != (len(m.state.categorical_sizes),):
            raise ValueError(f"state features {num.shape}/{cat.shape} do not match the config "
                             f"({m.state.numeric_dim}, {len(m.state.categorical_sizes)})")
        out["state_numeric"], out["state_categorical"] = num, cat
    else:
        out["state_numeric"] = np.zeros((m.state.numeric_dim,), np.float32)
        out["state_categorical"] = np.zeros((len(m.state.categorical_sizes),), np.int32)

    out["modality_mask"] = np.array([mel is not None, len(ids) > 0, frames is not None, num is not None],
                                    np.bool_)

    if m.bridge.n_constraint_tags != len(CONSTRAINT_TAGS):
        raise ValueError(f"config has {m.bridge.n_constraint_tags} constraint tags, the schema {len(CONSTRAINT_TAGS)}")
    tags = np.zeros((len(CONSTRAINT_TAGS),), np.bool_)
    for t in sample.get("constraint_tags") or []:
        if t not in _TAG_INDEX:
            raise ValueError(f"unknown constraint tag {t!r}")
        tags[_TAG_INDEX[t]] = True
    out["constraint_tags"] = tags
    out["history_actions"], out["history_before"] = history_rows(sample.get("history_actions"), m.action_len,
                                                                 vocab)

    if sample.get("rejected") is not None:  # a preference pair: nothing to imitate, two to compare
        out["action_tokens"] = action_row(sample["chosen"], m.action_len, vocab)[0]
        out["rejected_tokens"] = action_row(sample["rejected"], m.action_len, vocab)[0]
        out["has_actions"], out["has_pair"] = np.asarray(False), np.asarray(True)
    else:
        out["action_tokens"], out["has_actions"] = action_row(sample.get("actions"), m.action_len, vocab)
        out["rejected_tokens"] = np.zeros((m.action_len,), np.int32)
        out["has_pair"] = np.asarray(False)

    expl = sample.get("explanation")
    out["explanation_tokens"] = np.full((m.explain_len,), m.text_pad_id, np.int32)
    if expl:
        e = ([m.text_bos_id] + encode_text(tokenizer, expl) + [m.text_eos_id])[:m.explain_len]
        out["explanation_tokens"][:len(e)] = e
        out["explanation_mask"] = np.arange(m.explain_len) < len(e)
    else:
        out["explanation_mask"] = np.zeros((m.explain_len,), np.bool_)

    out["kind"] = np.asarray(spec.KINDS.index(sample["kind"]), np.int32)
    out["sample_id"] = np.asarray(sample["sample_id"], np.int64)
    return {k: np.asarray(out[k], shapes[k][1]) for k in shapes}


def action_row(actions, action_len: int, vocab: ActionVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Action tokens → (int32[action_len] = ids, <eos>, <pad>...; bool has_actions)."""
    row = np.zeros((action_len,), np.int32)  # <pad> = 0
    if actions is None:
        return row, np.asarray(False)
    ids = vocab.encode(list(actions))
    if len(ids) > action_len:
        raise ValueError(f"{len(actions)} actions do not fit action_len={action_len} "
                         f"(at most {action_len - 1} plus <eos>): {list(actions)}")
    row[:len(ids)] = ids
    return row, np.asarray(True)


def history_rows(log, action_len: int, vocab: ActionVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """An earlier turn's action log → (history_actions, history_before), both int32[action_len].

    Args:
      log: [[executed_token, before_token], ...] as `policy.Turn.log` writes it, or None / [] (no
        earlier turn: both rows all `<pad>`).
      action_len: the row length (`cfg.model.action_len`).
    Returns:
      executed ids, `<eos>`, `<pad>`...; and aligned with them the before-token ids (`<noop>`
      under `<noop>`), `<pad>` under `<eos>` and after.
    Raises:
      ValueError: a pair is not two tokens, a before-token names another path than its executed
        token, the log does not fit `action_len - 1`; `actions.InvalidActionSequence` for unknown
        tokens or a `<noop>` among actions.
    """
    before = np.zeros((action_len,), np.int32)  # <pad> = 0
    if not log:
        return np.zeros((action_len,), np.int32), before
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in log):
        raise ValueError(f"history_actions must be [executed, before] token pairs, got {log!r}")
    executed = [e for e, _ in log]
    try:  # the same checks as the target actions; the message says which field failed
        row = action_row(executed, action_len, vocab)[0]
    except InvalidActionSequence as e:
        raise InvalidActionSequence(e.position, f"history_actions: {e.reason}") from None
    except ValueError as e:
        raise ValueError(f"history_actions: {e}") from None
    for i, (e, b) in enumerate(log):
        # Under <noop> only <noop>; under a device token a token of the same path.
        if (e == NOOP) != (b == NOOP) or (e != NOOP and split_token(e)[0] != split_token(b)[0]):
            raise ValueError(f"history_actions[{i}]: before-token {b!r} is not a value of the path of {e!r}")
        if b not in vocab:
            raise InvalidActionSequence(i, f"unknown before-token {b!r} in history_actions")
        before[i] = vocab.token_id(b)
    return row, before


def featurize_pair(pair: dict, cfg, tokenizer, vocab: ActionVocabulary) -> dict[str, np.ndarray]:
    """A preference pair (`world.preference_pair` or a `tools.make_preferences` record) →
    `featurize` of its context with `action_tokens` = chosen, `rejected_tokens` = rejected,
    `has_pair` True and `has_actions` False (the chosen side is compared, not imitated)."""
    if pair.get("chosen") is None or pair.get("rejected") is None:
        raise ValueError(f"sample {pair.get('sample_id')} is not a preference pair (no chosen/rejected)")
    return featurize(pair, cfg, tokenizer, vocab)
