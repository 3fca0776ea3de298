"""Write a dataset directory of ArrayRecord shards (synthetic cabin world or real cabin logs).

    python -m tools.build_dataset --config configs/vla_cabin.py:tiny --out DIR --num-samples N \
        [--heldout-samples M] [--shards S] [--jsonl LOGS.jsonl] [--overwrite] [--config.data.x=v ...]

Without --jsonl it renders N train samples of the synthetic cabin world (spread evenly over the four
kinds; the same indices `make_dataset(source="synthetic")` reads with `data.synthetic_size = N`)
and M heldout samples (default `data.heldout_size`). With --jsonl it converts real logs. Each
(split, kind) gets S shards (default 1; fewer if there are fewer samples). The result is
`DIR/manifest.json` plus `{split}-{kind}-{i}-of-{n}.arrayrecord` files; the DataHash is printed.
It is written to a temporary directory next to DIR and renamed at the end, so a failed run leaves
nothing half-written. An existing non-empty DIR is refused unless --overwrite (and only replaced if
it holds a manifest.json, i.e. is a dataset directory).

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

Exit status: 0 ok, 2 on a bad argument, path, log line or record (one line on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlacabin_jax.data import actions, cabin, features, pipeline, records, shards
from vlacabin_jax.data.spec import KINDS


class BuildError(ValueError):
    """An expected failure: bad argument, path or log line."""


def load_config(spec: str, overrides: list[str] = ()):
    """Loads `path.py:variant` with `--config.a.b=value` overrides (`vlacabin_jax.config.load_config`)."""
    from vlacabin_jax.config import ConfigError, load_config as _load

    try:
        return _load(spec, overrides)
    except ConfigError as e:
        raise BuildError(str(e).removeprefix("--config: ")) from e


# ---------------------------------------------------------------- real-log media
def _mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """HTK mel filterbank float32[n_fft // 2 + 1, n_mels] from 0 Hz to sr / 2."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return tri.T.astype(np.float32)


def log_mel(audio: np.ndarray, sr: int, n_mels: int) -> np.ndarray:
    """float32[T, n_mels] log-mel of a mono waveform (25 ms Hann window, 10 ms hop).

    Args:
      audio: float[N] in [-1, 1].
      sr: sample rate in Hz.
    """
    win, hop = int(round(0.025 * sr)), max(1, sr // 100)
    n_fft = 1 << math.ceil(math.log2(win))
    audio = np.pad(audio.astype(np.float32), (0, max(0, win - len(audio))))
    n = 1 + (len(audio) - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(audio[idx] * np.hanning(win).astype(np.float32), n_fft)) ** 2
    return np.log(spec @ _mel_filters(sr, n_fft, n_mels) + 1e-6).astype(np.float32)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and sample rate of a PCM .wav file."""
    with wave.open(str(path), "rb") as w:
        width, ch, sr = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 3:  # 24-bit: widen to int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) | b[:, 1].astype(np.int32) << 8 | b[:, 2].astype(np.int32) << 16)
        x = np.where(x >= 1 << 23, x - (1 << 24), x) / float(1 << 23)
    elif width in (1, 2, 4):
        dt = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        x = np.frombuffer(raw, dt).astype(np.float64)
        x = (x - 128) / 128 if width == 1 else x / float(1 << (8 * width - 1))
    else:
        raise BuildError(f"{path}: {8 * width}-bit wav not supported")
    return x.reshape(-1, ch).mean(axis=1).astype(np.float32), sr


def read_image(path: Path, size: int) -> np.ndarray:
    """uint8[size, size, 3]: centre-cropped to a square, nearest-neighbour resized."""
    if path.suffix == ".npy":
        img = np.load(path, allow_pickle=False)
    elif path.suffix == ".png":
        try:
            from PIL import Image
        except ImportError:
            raise BuildError(f"{path}: reading .png needs Pillow (pip install pillow); "
                             f"or convert images to .npy") from None
        img = np.asarray(Image.open(path).convert("RGB"))
    else:
        raise BuildError(f"{path}: images must be .npy (or .png with Pillow)")
    return _square(img, size, path)


def _square(img: np.ndarray, size: int, path: Path) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4) or img.dtype != np.uint8 or 0 in img.shape:
        raise BuildError(f"{path}: expected uint8[H, W, 3], got {img.dtype}{list(img.shape)}")
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
    pick = (np.arange(size) * s) // size
    return np.ascontiguousarray(img[pick][:, pick])


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
        clip = np.stack([_square(f, size, path) for f in clip])
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


# ---------------------------------------------------------------- plan and write
def synthetic_plan(cfg, n_train: int, n_heldout: int):
    """{(split, kind): (count, index -> sample)} for the synthetic world."""
    plan = {}
    for split, total in (("train", n_train), ("heldout", n_heldout)):
        counts = shards.split_counts(total)
        offset = pipeline.HELDOUT_OFFSET if split == "heldout" else 0
        for kind in KINDS:
            src = pipeline.SyntheticSource(pipeline.synthetic_params(cfg), kind, counts[kind], offset)
            plan[(split, kind)] = (counts[kind], src.__getitem__)
    return plan


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


def build(cfg, out: Path, plan: dict, num_shards: int, generator: dict, overwrite: bool,
          progress: bool = True) -> str:
    """Writes every (split, kind) of `plan` into shards under `out` (atomically); returns the DataHash."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise BuildError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not (out / shards.MANIFEST).is_file():
            raise BuildError(f"{out} has no {shards.MANIFEST}: not a dataset directory, "
                             f"refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)  # mkdtemp makes the directory private; publish it like any other dir
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        entries = []
        total = sum(count for count, _ in plan.values())
        with tqdm(total=total, unit="sample", desc=f"build {out.name}", disable=not progress) as bar:
            for (split, kind), (count, get) in plan.items():
                ranges = shards.shard_ranges(count, num_shards)
                for i, (lo, hi) in enumerate(ranges):
                    name = shards.shard_name(split, kind, i, len(ranges))

                    def data(lo=lo, hi=hi):
                        for j in range(lo, hi):
                            yield records.encode(get(j))
                            bar.update(1)

                    entries.append(dict(shards.write_shard(tmp / name, data()), split=split, kind=kind))
        manifest = shards.make_manifest(entries, generator, actions.VERSION)
        digest = shards.write_manifest(tmp, manifest)
        shards.load_manifest(tmp, verify_hashes=True)  # read back what we wrote before publishing
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        return digest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 on an expected error)."""
    parser = argparse.ArgumentParser(prog="python -m tools.build_dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/vla_cabin.py:VARIANT")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument("--num-samples", type=int, help="synthetic train samples (required without --jsonl)")
    parser.add_argument("--heldout-samples", type=int,
                        help="synthetic heldout samples (default data.heldout_size)")
    parser.add_argument("--shards", type=int, default=1, help="shards per (split, kind)")
    parser.add_argument("--jsonl", type=Path, help="real-log manifest (schema in this module's doc)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        cfg = load_config(args.config, extra)
        if args.shards < 1:
            raise BuildError("--shards must be >= 1")
        if args.jsonl is not None:
            if not args.jsonl.is_file():
                raise BuildError(f"--jsonl: no such file {args.jsonl}")
            plan = jsonl_plan(cfg, args.jsonl)
            gen = {k: v for k, v in pipeline.synthetic_params(cfg).items()
                   if k not in ("seed", "heldout_offset")}
            gen.update(source="jsonl", jsonl=args.jsonl.name,
                       jsonl_sha256=hashlib.sha256(args.jsonl.read_bytes()).hexdigest())
        else:
            if args.num_samples is None:
                raise BuildError("give --num-samples N (synthetic world) or --jsonl LOGS.jsonl")
            n = args.num_samples
            m = cfg.data.heldout_size if args.heldout_samples is None else args.heldout_samples
            if n < 0 or m < 0:
                raise BuildError("--num-samples and --heldout-samples must be >= 0")
            plan, gen = synthetic_plan(cfg, n, m), pipeline.synthetic_params(cfg)
        digest = build(cfg, args.out, plan, args.shards, gen, args.overwrite)
    except (BuildError, records.CorruptRecord, shards.CorruptShard, OSError) as e:
        print(f"build_dataset: error: {e}", file=sys.stderr)
        return 2
    counts = json.loads((args.out / shards.MANIFEST).read_text())["counts"]
    for split, c in counts.items():
        print(f"{split}: {sum(c.values())} samples ({', '.join(f'{k} {v}' for k, v in c.items())})")
    print(f"wrote {args.out}")
    print(f"DataHash {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
