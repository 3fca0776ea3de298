"""Real cabin logs (one JSON object per line) as samples of the synthetic world's format.

    jsonl_plan(cfg, path)       -> {(split, kind): (count, index -> sample)}  for `build.build`
    jsonl_generator(cfg, path)  -> the manifest's generator record (the file's sha256)

Real-log JSONL schema: one JSON object per line (blank lines and lines starting with # ignored);
relative paths are relative to the JSONL file's directory.

    kind         "vla" | "image_text" | "video_text" | "speech_text"        (required)
    text         str: instruction, caption or transcript                    (required)
    split        "train" | "heldout"                                       (default "train")
    id           int >= 0, unique in the file: the sample_id               (default: line number)
    language     "en" | "zh" | ...                                         (default "en")
    scene        str or null: scene mode the turn belongs to               (default null)
    history      list of str: earlier turns of the dialogue                (default [])
    history_actions  list of [executed, before] action-token pairs: what the cabin executed in
                 the latest earlier turn, in order, each with `path=value` of the value that path
                 had before it (`[["<noop>", "<noop>"]]` when that turn did nothing); checked
                 against the action vocabulary, at most action_len - 1 pairs  (default [])
    audio        path to .wav (PCM, any rate; mono-mixed, turned into log-mel here: 25 ms Hann
                 window, 10 ms hop, n_mels HTK mel bins up to rate/2, natural log of power + 1e-6)
                 or .npy float32[T, n_mels] log-mel already; audio longer than data.mel_frames
                 keeps its first mel_frames frames                          (optional)
    image        path to one image                                          (optional)
    frames       list of image paths, or one .npy uint8[F, H, W, 3] clip    (optional)
                 Images are .npy uint8[H, W, 3] (or [H, W] grey); .png only if Pillow is installed.
                 Every image is centre-cropped to a square and resized (nearest neighbour) to the
                 config's image size; clips with more than data.num_frames frames are subsampled
                 evenly.
    state        path to a .json file or an inline object: cabin state as
                 `cabin.CabinState.to_json()` writes it; "devices" may list only some setting paths
                 (the rest take schema defaults) and environment fields may be left out  (optional)
    constraint_tags  list of str from cabin.CONSTRAINT_TAGS                 (default [])
    actions      list of action tokens (checked against the action vocabulary), or null
    explanation  str or null
"""

from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np

from vlacabin_jax.data import actions, cabin, features, pipeline, records, shards
from vlacabin_jax.data.build import BuildError
from vlacabin_jax.data.media import log_mel, read_image, read_wav, square
from vlacabin_jax.data.spec import KINDS


def _resolve(base: Path, value: Any, field: str) -> Path:
    if not isinstance(value, str) or not value:
        raise BuildError(f"field {field!r} must be a path string")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise BuildError(f"field {field!r}: no such file {path}")
    return path


def _frames(obj: dict, base: Path, cfg) -> np.ndarray | None:
    size, nf = int(cfg.model.vit.image_size), int(cfg.data.num_frames)
    if obj.get("frames") is not None and obj.get("image") is not None:
        raise BuildError("give either 'image' or 'frames', not both")
    if obj.get("image") is not None:
        return read_image(_resolve(base, obj["image"], "image"), size)[None]
    value = obj.get("frames")
    if value is None:
        return None
    if isinstance(value, str):
        path = _resolve(base, value, "frames")
        clip = np.load(path, allow_pickle=False) if path.suffix == ".npy" else None
        if clip is None or clip.ndim != 4:
            raise BuildError(f"{path}: a clip must be .npy uint8[F, H, W, 3]")
        clip = np.stack([square(f, size, path) for f in clip])
    elif isinstance(value, list) and value:
        clip = np.stack([read_image(_resolve(base, v, "frames"), size) for v in value])
    else:
        raise BuildError("field 'frames' must be a .npy path or a non-empty list of image paths")
    if len(clip) > nf:  # evenly spaced, first and last kept
        clip = clip[np.linspace(0, len(clip) - 1, nf).round().astype(int)]
    return clip


def _mel(obj: dict, base: Path, cfg) -> np.ndarray | None:
    """float32[T <= data.mel_frames, n_mels]: longer audio keeps its first mel_frames frames."""
    if obj.get("audio") is None:
        return None
    path, n_mels = _resolve(base, obj["audio"], "audio"), int(cfg.model.speech.n_mels)
    if path.suffix == ".wav":
        try:
            mel = log_mel(*read_wav(path), n_mels)
        except (wave.Error, EOFError) as e:
            raise BuildError(f"{path}: not a PCM wav file: {e}") from None
    elif path.suffix == ".npy":
        mel = np.load(path, allow_pickle=False)
        if mel.ndim != 2 or mel.shape[1] != n_mels or mel.dtype.kind != "f":
            raise BuildError(f"{path}: expected float[T, {n_mels}] log-mel, "
                             f"got {mel.dtype}{list(mel.shape)}")
    else:
        raise BuildError(f"{path}: audio must be .wav or .npy")
    return np.ascontiguousarray(mel[:int(cfg.data.mel_frames)], np.float32)


def _state(obj: dict, base: Path) -> cabin.CabinState | None:
    value = obj.get("state")
    if value is None:
        return None
    if isinstance(value, str):
        path = _resolve(base, value, "state")
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BuildError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BuildError("field 'state' must be an object or a .json path")
    value = dict(value)
    devices = value.pop("devices", {})
    unknown = set(devices) - set(cabin.PATHS)
    if unknown:
        raise BuildError(f"state: unknown device paths {sorted(unknown)}")
    for k in ("occupants", "asleep", "tags"):
        if k in value:
            value[k] = tuple(value[k])
    try:
        return cabin.default_state().replace(devices=devices, **value)
    except TypeError as e:
        raise BuildError(f"state: {e}") from None


_LOG_FIELDS = {"kind", "text", "split", "id", "language", "scene", "history", "history_actions", "audio",
               "image", "frames", "state", "constraint_tags", "actions", "explanation"}


def _history_actions(obj: dict, cfg, vocab: actions.ActionVocabulary) -> list[list[str]]:
    """The checked `history_actions` of a log object (the earlier turn's action log)."""
    log = obj.get("history_actions", [])
    if not isinstance(log, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in log):
        raise BuildError("'history_actions' must be a list of [executed, before] action-token pairs")
    try:  # the featurizer's own checks: tokens in the vocabulary, paths paired, fits action_len
        features.history_rows(log, int(cfg.model.action_len), vocab)
    except ValueError as e:
        raise BuildError(f"history_actions {log}: {e}") from None
    return [list(p) for p in log]


def log_sample(obj: dict, base: Path, cfg, vocab: actions.ActionVocabulary, sample_id: int) -> dict:
    """One JSONL log object -> a sample dict as `world.generate` returns it (see module doc)."""
    unknown = set(obj) - _LOG_FIELDS
    if unknown:
        raise BuildError(f"unknown fields {sorted(unknown)}")
    if obj.get("kind") not in KINDS or not isinstance(obj.get("text"), str):
        raise BuildError(f"'kind' must be one of {KINDS} and 'text' a string")
    tags = obj.get("constraint_tags", [])
    bad = [t for t in tags if t not in cabin.CONSTRAINT_TAGS]
    if bad:
        raise BuildError(f"unknown constraint tags {bad}; known: {cabin.CONSTRAINT_TAGS}")
    if not all(isinstance(h, str) for h in obj.get("history", [])):
        raise BuildError("'history' must be a list of strings")
    acts = obj.get("actions")
    if acts is not None:
        try:
            vocab.encode(acts)
        except Exception as e:  # invalid tokens are reported, never guessed
            raise BuildError(f"actions {acts}: {e}") from None
        if len(acts) > cfg.model.action_len - 1:
            raise BuildError(f"{len(acts)} actions do not fit this config's action_len "
                             f"{cfg.model.action_len} (at most {cfg.model.action_len - 1} + <eos>)")
    history_actions = _history_actions(obj, cfg, vocab)
    state = _state(obj, base)
    num, cat = cabin.state_to_features(state) if state is not None else (None, None)
    sample = {"sample_id": int(sample_id), "kind": obj["kind"], "language": obj.get("language", "en"),
              "scene": obj.get("scene"), "text": obj["text"], "history": list(obj.get("history", [])),
              "history_actions": history_actions,
              "mel": _mel(obj, base, cfg), "frames": _frames(obj, base, cfg),
              "state_numeric": num, "state_categorical": cat, "constraint_tags": list(tags),
              "actions": None if acts is None else list(acts), "explanation": obj.get("explanation"),
              "state": state.to_json() if state is not None else {}}
    records.validate(sample)
    return sample


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank, non-comment line; ids checked unique."""
    out, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BuildError(f"{path}:{n}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise BuildError(f"{path}:{n}: expected a JSON object")
        sid = obj.get("id", n)
        if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < 1 << 63:
            raise BuildError(f"{path}:{n}: 'id' must be an int in [0, 2**63), got {sid!r}")
        if sid in seen:
            raise BuildError(f"{path}:{n}: id {sid} already used on line {seen[sid]}")
        if obj.get("split", "train") not in shards.SPLITS:
            raise BuildError(f"{path}:{n}: split must be one of {shards.SPLITS}")
        seen[sid] = n
        out.append((n, obj))
    return out


def jsonl_plan(cfg, path: Path):
    """{(split, kind): (count, index -> sample)} for a real-log JSONL file (lines in file order)."""
    lines = read_jsonl(path)
    vocab = actions.ActionVocabulary()
    plan = {}
    for split in shards.SPLITS:
        for kind in KINDS:
            group = [(n, o) for n, o in lines
                     if o.get("split", "train") == split and o.get("kind") == kind]

            def get(i, group=group):
                n, obj = group[i]
                try:
                    return log_sample(obj, path.parent, cfg, vocab, obj.get("id", n))
                except (BuildError, records.CorruptRecord, OSError, ValueError) as e:
                    raise BuildError(f"{path}:{n}: {e}") from None

            plan[(split, kind)] = (len(group), get)
    unknown = [n for n, o in lines if o.get("kind") not in KINDS]
    if unknown:
        raise BuildError(f"{path}:{unknown[0]}: 'kind' must be one of {KINDS}")
    return plan


def jsonl_generator(cfg, path: Path) -> dict:
    """The manifest's `generator` for logs: the config's world fields that apply, the file and its sha256."""
    gen = {k: v for k, v in pipeline.synthetic_params(cfg).items() if k not in ("seed", "heldout_offset")}
    gen.update(source="jsonl", jsonl=path.name, jsonl_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    return gen
