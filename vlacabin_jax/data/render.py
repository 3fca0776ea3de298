"""Cheap, deterministic numpy rendering of the cues a model must see and hear.

Frames: a camera at the dashboard looks back into the cabin. The image is a 2×2 grid of seats
(top row: rear seats, bottom row: front seats; left column: driver side). An adult is a head and a
torso; a child sits in an orange child seat with a smaller head. Someone asleep has the head
tilted sideways and lowered, eyes shut (a line), and does not move between frames; someone awake
has two open eyes and moves a little from frame to frame. The image is scaled by the cabin light
level; a dark cabin switches the camera to infrared (grey, bluish, dim, noisier),
the ambient light strip along the bottom shows the ambient colour and brightness, the roof band
shows the sunshade, the side bands show open windows.

Mel: log-mel-like features of the spoken request. Each word (English) or character (Chinese) is a
syllable with two formant bands at positions fixed by a stable hash of the word; the voice adds
harmonics of its pitch. A stressed voice has a higher pitch, more energy, pitch jitter and a fast
energy modulation; a calm voice is low, soft and steady. Driving adds low-frequency road noise.
"""

from __future__ import annotations

import functools
import re
import zlib

import numpy as np

from vlacabin_jax.data.actions import SEATS

DARK = 0.35  # = cabin.DARK (not imported: rendering does not depend on the rules)

# Seat cell centres in normalised image coordinates (y, x).
SEAT_CENTERS = {"rear_left": (0.30, 0.27), "rear_right": (0.30, 0.73),
                "driver": (0.72, 0.27), "passenger": (0.72, 0.73)}
SEAT_HALF = 0.19  # half the size of a seat cell (the cue region of that seat)
AMBIENT_RGB = {"warm": (255, 170, 80), "white": (240, 240, 240), "blue": (60, 120, 255),
               "purple": (170, 70, 230), "green": (60, 220, 110), "red": (235, 50, 50)}
_SKIN = np.array([225, 180, 140], np.float32)
_SEAT_RGB = np.array([70, 70, 78], np.float32)
_CHILD_SEAT_RGB = np.array([250, 130, 20], np.float32)


def seat_box(seat: str, size: int) -> tuple[slice, slice]:
    """Pixel slices (rows, cols) of a seat's cell: where that seat's cues are drawn."""
    cy, cx = SEAT_CENTERS[seat]
    return (slice(int((cy - SEAT_HALF) * size), int((cy + SEAT_HALF) * size)),
            slice(int((cx - SEAT_HALF) * size), int((cx + SEAT_HALF) * size)))


def _rect(img: np.ndarray, y0: float, y1: float, x0: float, x1: float, rgb) -> None:
    """Fill a rectangle given in normalised coordinates (at least one pixel)."""
    s = img.shape[-2]
    r0, c0 = max(0, int(y0 * s)), max(0, int(x0 * s))
    img[..., r0:max(r0 + 1, int(round(y1 * s))), c0:max(c0 + 1, int(round(x1 * s))), :] = rgb


@functools.lru_cache(maxsize=64)
def _disk_mask(r2: int) -> np.ndarray:
    """Boolean disk of radius r2/2 pixels on a (2k+1)² grid (cached per radius)."""
    r = r2 / 2
    k = int(np.ceil(r))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    return yy * yy + xx * xx <= r * r - 0.3 * r


def _disk(img: np.ndarray, cy: float, cx: float, r: float, rgb) -> None:
    s = img.shape[-2]
    mask = _disk_mask(max(2, int(round(2 * r * s))))
    k = mask.shape[0] // 2
    y, x = int(cy * s), int(cx * s)
    y0, y1, x0, x1 = max(0, y - k), min(s, y + k + 1), max(0, x - k), min(s, x + k + 1)
    img[y0:y1, x0:x1][mask[y0 - y + k:y1 - y + k, x0 - x + k:x1 - x + k]] = rgb


def render_frames(state, rng: np.random.Generator, image_size: int, num_frames: int) -> np.ndarray:
    """Render the cabin camera.

    Args:
      state: a `cabin.CabinState` (occupants, asleep, light, ambient light, sunshade, windows).
      rng: the sample's generator (clothes colours, motion, sensor noise).
      image_size: S, pixels per side.
      num_frames: F ≥ 1 (1 = a still image).
    Returns:
      uint8[F, S, S, 3].
    """
    if image_size < 8 or num_frames < 1:
        raise ValueError(f"need image_size >= 8 and num_frames >= 1, got {image_size}, {num_frames}")
    s = image_size
    base = np.empty((s, s, 3), np.float32)
    base[:] = (38, 36, 44)  # cabin interior
    d = state.devices
    roof = {"open": (150, 190, 235), "half": (95, 110, 135), "closed": (25, 25, 30)}[d["sunshade.roof"]]
    _rect(base, 0.0, 0.07, 0.0, 1.0, roof)
    for seat in SEATS:  # side bands: a window open shows the outside
        open_ = d[f"window.{seat}"] != "closed"
        cy = SEAT_CENTERS[seat][0]
        x0 = 0.0 if seat in ("driver", "rear_left") else 0.95
        _rect(base, cy - 0.15, cy + 0.15, x0, x0 + 0.05, (170, 200, 230) if open_ else (20, 30, 40))
    movers = []
    shirts = rng.integers(40, 220, size=(len(SEATS), 3)).astype(np.float32)
    for i, seat in enumerate(SEATS):
        cy, cx = SEAT_CENTERS[seat]
        occ = state.occupants[i]
        _rect(base, cy - 0.15, cy + 0.17, cx - 0.14, cx + 0.14, _SEAT_RGB)  # seat back
        if occ == "empty":
            continue
        child = occ == "child"
        if child:  # the orange child seat shell with the child inside
            _rect(base, cy - 0.10, cy + 0.17, cx - 0.13, cx + 0.13, _CHILD_SEAT_RGB)
            _rect(base, cy - 0.02, cy + 0.15, cx - 0.07, cx + 0.07, shirts[i])
        else:
            _rect(base, cy + 0.0, cy + 0.17, cx - 0.11, cx + 0.11, shirts[i])
        head = (cy - (0.05 if child else 0.08), cx, 0.055 if child else 0.075)
        if state.asleep[i]:  # asleep: head tilted to the side and lowered, eyes shut, still
            side = 1.0 if cx < 0.5 else -1.0
            _disk(base, head[0] + 0.05, cx + side * 0.07, head[2], _SKIN)
            _rect(base, head[0] + 0.05, head[0] + 0.06, cx + side * 0.07 - 0.03, cx + side * 0.07 + 0.03, (60, 40, 30))
        else:
            movers.append(head)
    eye = np.array([20, 20, 25], np.float32)
    frames = np.repeat(base[None], num_frames, axis=0)
    for f in range(num_frames):  # awake heads move a little from frame to frame
        for hy, hx, r in movers:
            dy, dx = rng.uniform(-0.03, 0.03, size=2)
            _disk(frames[f], hy + dy, hx + dx, r, _SKIN)
            for ex in (-0.03, 0.015):  # open eyes: two dots
                _rect(frames[f], hy + dy - 0.02, hy + dy, hx + dx + ex, hx + dx + ex + 0.015, eye)
    # Cabin light. In daylight the image scales with the light level; in a dark cabin the camera
    # switches to its infrared mode: grey, bluish, dim and noisier, but people stay visible.
    light = float(state.light)
    if light >= DARK:
        frames *= light
        frames += rng.standard_normal(size=frames.shape, dtype=np.float32) * np.float32(4.0)
    else:  # monochrome sensor: the noise is grey too
        gray = frames.mean(-1, keepdims=True)
        gray += rng.standard_normal(size=gray.shape, dtype=np.float32) * np.float32(7.0)
        frames = (0.2 * frames + 0.8 * gray) * ((0.3 + light) * np.array([0.85, 0.95, 1.1], np.float32))
    bright = int(d["light.ambient.brightness"])
    if bright:  # the ambient strip glows by itself, even in the dark
        rgb = np.array(AMBIENT_RGB[d["light.ambient.color"]], np.float32) * (0.3 + 0.14 * bright)
        _rect(frames, 0.95, 1.0, 0.05, 0.95, rgb)
    return np.clip(frames, 0, 255).astype(np.uint8)


FORMANT_AMPS = (1.0, 0.8)  # heights of a syllable's first and second formant bump
_WORD = re.compile(r"[A-Za-z']+|\d+|[\u4e00-\u9fff]")


def syllables(text: str) -> list[str]:
    """The spoken units of an utterance: English words/numbers, single Chinese characters."""
    return [w.lower() for w in _WORD.findall(text)]


def spoken_units(text: str, mel_frames: int) -> tuple[list[str], int]:
    """(the syllables `render_mel` speaks, frames per syllable): at most mel_frames - 2 syllables
    (one silent frame before and after), each held for 1..4 frames; "." for an empty text."""
    if mel_frames < 3:
        raise ValueError(f"mel_frames={mel_frames}: need at least 3 (silence, speech, silence)")
    units = syllables(text)[: mel_frames - 2] or ["."]
    return units, int(np.clip((mel_frames - 2) // len(units), 1, 4))


def formant_width(n_mels: int) -> float:
    """Standard deviation, in mel bins, of every spectral bump `render_mel` draws."""
    return max(0.6, n_mels / 40)


def formant_template(units: list[str], per: int, n_mels: int) -> np.ndarray:
    """The formant part of `render_mel`'s speech frames before the voice's energy: float32[per *
    len(units), n_mels], per frame a bump of height `FORMANT_AMPS[0]` at the syllable's first
    formant bin and `FORMANT_AMPS[1]` at its second (no pitch, noise or silence). What a decoder
    matches a mel against."""
    bins = np.arange(n_mels, dtype=np.float32)
    width = formant_width(n_mels)
    f1, f2 = formant_bins(units, n_mels)
    out = np.zeros((len(units), n_mels), np.float32)
    for f, amp in zip((f1, f2), FORMANT_AMPS):
        out += amp * np.exp(-((bins[None, :] - f[:, None].astype(np.float32)) ** 2) / (2 * width * width))
    return np.repeat(out, per, axis=0)


def formant_bins(units: list[str], n_mels: int) -> tuple[np.ndarray, np.ndarray]:
    """The two formant mel bins of each syllable: int64[len(units)] each, fixed by crc32 of the
    syllable (so a decoder can match a mel against known syllables)."""
    codes = np.array([zlib.crc32(u.encode()) for u in units], np.int64)
    span = max(1, int(0.6 * n_mels))
    lo = int(0.35 * n_mels)
    return lo + codes % span, lo + (codes // span) % span


def render_mel(text: str, voice: str, driving: bool, rng: np.random.Generator, n_mels: int,
               mel_frames: int) -> np.ndarray:
    """Render a spoken utterance.

    Args:
      text: what is said (its syllables set the formant pattern).
      voice: "calm" or "stressed".
      driving: add road noise.
      rng: the sample's generator.
      n_mels: mel bins; mel_frames: the most frames T may have.
    Returns:
      float32[T, n_mels] with T ≤ mel_frames (1 silent frame before and after the speech).
    """
    units, per = spoken_units(text, mel_frames)
    t = 2 + per * len(units)
    bins = np.arange(n_mels, dtype=np.float32)
    width = formant_width(n_mels)
    f1, f2 = (np.repeat(f, per).astype(np.float32) for f in formant_bins(units, n_mels))
    stressed = voice == "stressed"
    n = per * len(units)
    f0 = (0.13 if stressed else 0.06) * n_mels + (rng.normal(0, 0.8, n) if stressed else rng.normal(0, 0.1, n))
    centers = np.stack([f1, f2, f0, 2 * f0, 3 * f0], axis=1)  # [n, 5]
    amps = np.array([*FORMANT_AMPS, 1.0, 0.6, 0.35], np.float32)  # formants, then f0 harmonics
    bumps = np.exp(-((bins[None, None, :] - centers[:, :, None]) ** 2) / (2 * width * width))
    speech = (bumps * amps[None, :, None]).sum(1)  # [n, n_mels]
    k = np.arange(n)
    energy = (2.4 + 0.7 * np.sign(np.sin(2.1 * k + 0.5))) if stressed else (1.6 + 0.1 * np.sin(0.4 * k))
    mel = np.full((t, n_mels), -4.0, np.float32)
    mel[1:-1] += speech * energy[:, None]
    if driving:  # road rumble in the lowest bins
        mel += 1.2 * np.exp(-bins / max(1.0, 0.08 * n_mels))[None, :]
    mel += rng.normal(0, 0.15, size=mel.shape).astype(np.float32)
    return mel.astype(np.float32)
