"""Camera and microphone files of real cabin logs as model inputs (numpy only; Pillow for .png).

    log_mel(audio, sr, n_mels)   -> float32[T, n_mels]   (25 ms Hann window, 10 ms hop, HTK mel)
    read_wav(path)               -> (float32[N] mono in [-1, 1], sample rate)
    read_image(path, size)       -> uint8[size, size, 3] (centre square, nearest neighbour)
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from vlacabin_jax.data.build import BuildError


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
    return square(img, size, path)


def square(img: np.ndarray, size: int, path: Path) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4) or img.dtype != np.uint8 or 0 in img.shape:
        raise BuildError(f"{path}: expected uint8[H, W, 3], got {img.dtype}{list(img.shape)}")
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
    pick = (np.arange(size) * s) // size
    return np.ascontiguousarray(img[pick][:, pick])
