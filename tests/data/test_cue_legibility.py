"""The cues that decide answers are legible in the rendered inputs, at the tiny config's resolution.

A small learned probe reads each perceptual fact the policy depends on from what the model sees
(32 px frames, 4 of them; 32 mel bins, up to 32 mel frames), trained on world samples of the train
index range and scored on the heldout range (disjoint indices):

    fact                     read from   features (simple and stated)
    dark cabin               frames      the clip averaged over time, pooled to 8x8 RGB, and its
                                         mean colour saturation (the infrared camera is grey)
    child, per seat          frames      the seat's cell (`render.seat_box`): its pixels averaged
    asleep, per seat                     over the frames (shape, position of the head, the child
                                         seat shell) and the mean absolute frame-to-frame change
                                         of each pixel (the awake move a little, sleepers do not)
    calm / stressed voice    mel         per mel bin the mean and standard deviation over the
                                         speech frames, and the mean absolute change of the frame
                                         energy (a stressed voice is higher, louder, and pulses)

The probe is an L2-regularised logistic regression on standardised features, fitted by L-BFGS: no
threshold is set by hand. Each fact must be read with >= 99 % heldout accuracy and >= 99 % on each
of its two classes (so a rare class cannot hide behind the common one). Facts the world never
varies (the driver neither sleeps nor sits in a child seat; no child seat in front) are checked
to be constant instead.

These are the facts `oracle.perceptual_facts` hands the input oracle (tests/data/test_input_oracle.py).
"""

import numpy as np
import pytest
from scipy.optimize import minimize

from configs.vla_cabin import get_config
from vlacabin_jax.data import pipeline, render, world
from vlacabin_jax.data.actions import SEATS

NUM_TRAIN, NUM_TEST = 3000, 2000
MIN_ACCURACY = 0.99


def _world(cfg, offset: int, n: int) -> list[tuple[dict, str | None]]:
    """(VLA sample, its voice) for world indices offset .. offset + n - 1 at the config's sizes."""
    seed = int(cfg.data.world_seed)
    out = []
    for i in range(offset, offset + n):
        s = world.generate(seed, i, "vla", cfg.model.vit.image_size, cfg.data.num_frames,
                           cfg.model.speech.n_mels, cfg.data.mel_frames)
        out.append((s, world.vla_context(seed, i).voice))  # the mel's voice, not in the sample
    return out


@pytest.fixture(scope="module")
def data():
    cfg = get_config("tiny")
    return cfg, _world(cfg, 0, NUM_TRAIN), _world(cfg, pipeline.HELDOUT_OFFSET, NUM_TEST)


# ---------------------------------------------------------------- features
def _clips(samples) -> np.ndarray:
    """float32[n, F, S, S, 3] in [0, 1]."""
    return np.stack([s["frames"] for s, _ in samples]).astype(np.float32) / 255.0


def light_features(clips: np.ndarray) -> np.ndarray:
    """float32[n, 8 * 8 * 3 + 1]: the time-averaged clip pooled to 8x8 RGB, and its saturation."""
    n, _, size, _, _ = clips.shape
    still = clips.mean(axis=1)
    pooled = still.reshape(n, 8, size // 8, 8, size // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    saturation = np.abs(still - still.mean(-1, keepdims=True)).mean(axis=(1, 2, 3))
    return np.concatenate([pooled, saturation[:, None]], axis=1)


def seat_features(clips: np.ndarray, seat: str) -> np.ndarray:
    """float32[n, 2 * cell pixels * 3]: the seat cell averaged over frames, and its mean absolute
    frame-to-frame change per pixel."""
    rows, cols = render.seat_box(seat, clips.shape[2])
    cell = clips[:, :, rows, cols, :]
    n = len(clips)
    motion = np.abs(np.diff(cell, axis=1)).mean(axis=1)
    return np.concatenate([cell.mean(axis=1).reshape(n, -1), motion.reshape(n, -1)], axis=1)


def voice_features(mels: list[np.ndarray]) -> np.ndarray:
    """float32[n, 2 * n_mels + 1] of mels float32[T_i, n_mels]: per bin the mean and standard
    deviation over the speech frames (the silent first and last left out), and the mean absolute
    change of the frame energy."""
    rows = []
    for mel in mels:
        speech = mel[1:-1]
        energy = speech.mean(axis=1)
        rows.append(np.concatenate([speech.mean(0), speech.std(0), [np.abs(np.diff(energy)).mean()]]))
    return np.asarray(rows, np.float32)


# ---------------------------------------------------------------- the probe
def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-2):
    """L2-regularised logistic regression, fitted by L-BFGS on standardised features.

    Args:
      x: float[n, d] features; y: bool[n] labels.
    Returns:
      predict: float[m, d] -> bool[m].
    """
    mu, sd = x.mean(0), x.std(0) + 1e-3  # constant features (e.g. never-lit pixels) stay finite

    def design(a):
        return np.concatenate([(a - mu) / sd, np.ones((len(a), 1))], axis=1).astype(np.float64)

    z, t = design(x), y.astype(np.float64)

    def loss_and_grad(w):
        logits = z @ w
        p = 1.0 / (1.0 + np.exp(-logits))
        loss = np.logaddexp(0.0, logits).mean() - (t * logits).mean() + 0.5 * l2 * (w[:-1] ** 2).sum()
        grad = z.T @ (p - t) / len(t)
        grad[:-1] += l2 * w[:-1]  # the bias is not regularised
        return loss, grad

    w = minimize(loss_and_grad, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B",
                 options={"maxiter": 500}).x
    return lambda a: design(a) @ w > 0


def _check(name: str, x_train, y_train, x_test, y_test) -> dict:
    """Fit on train, score on test; asserts the accuracy bars and returns the scores."""
    assert 0 < y_train.mean() < 1 and 0 < y_test.mean() < 1, f"{name}: one class only"
    pred = fit_probe(x_train, y_train)(x_test)
    scores = {"accuracy": float((pred == y_test).mean()),
              "recall_false": float((~pred[~y_test]).mean()), "recall_true": float(pred[y_test].mean()),
              "positives": int(y_test.sum()), "n": len(y_test)}
    assert min(scores["accuracy"], scores["recall_false"], scores["recall_true"]) >= MIN_ACCURACY, (name, scores)
    return scores


# ---------------------------------------------------------------- the facts
def test_dark_cabin_is_legible_from_the_frames(data):
    _, train, test = data
    dark = lambda ss: np.array([s["state"]["light"] < render.DARK for s, _ in ss])  # noqa: E731
    _check("dark", light_features(_clips(train)), dark(train), light_features(_clips(test)), dark(test))


@pytest.mark.parametrize("fact", ["child", "asleep"])
def test_child_and_sleeper_per_seat_are_legible_from_the_frames(data, fact):
    _, train, test = data
    clips_train, clips_test = _clips(train), _clips(test)

    def labels(samples, j):
        if fact == "child":
            return np.array([s["state"]["occupants"][j] == "child" for s, _ in samples])
        return np.array([bool(s["state"]["asleep"][j]) for s, _ in samples])

    varied = []
    for j, seat in enumerate(SEATS):
        y_train, y_test = labels(train, j), labels(test, j)
        if not y_train.any() and not y_test.any():  # the world never has it here: nothing to read
            assert (seat, fact) in {("driver", "child"), ("driver", "asleep"), ("passenger", "child")}
            continue
        _check(f"{fact} {seat}", seat_features(clips_train, seat), y_train, seat_features(clips_test, seat), y_test)
        varied.append(seat)
    assert set(varied) >= {"rear_left", "rear_right"}


def test_calm_or_stressed_voice_is_legible_from_the_mel(data):
    _, train, test = data
    spoken_train = [(s, v) for s, v in train if s["mel"] is not None]
    spoken_test = [(s, v) for s, v in test if s["mel"] is not None]
    assert all(v in ("calm", "stressed") for _, v in spoken_train + spoken_test)
    stressed = lambda ss: np.array([v == "stressed" for _, v in ss])  # noqa: E731
    _check("voice", voice_features([s["mel"] for s, _ in spoken_train]), stressed(spoken_train),
           voice_features([s["mel"] for s, _ in spoken_test]), stressed(spoken_test))
