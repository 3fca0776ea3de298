"""Simulator-scored preference pairs: sample K answers from a policy, score them, pair best with worst.

    reward(record)                                   -> float, from a `metrics.score_sample` record
    sample_candidates(trainable, frozen, cfg, samples, k, noise_scale) -> K token lists per sample
    pair(sample, candidates)                         -> a pair record (chosen = best, rejected = worst) or None
    make_pairs(samples, candidates)                  -> (pairs, stats)

The DNFM sampler is deterministic given z0, so K answers are K draws of the variational noise of
the latents and of z0 (`VLACabin.sample_actions`); draw 0 is noise-free, i.e. exactly what `infer`
and the evaluation answer, so the pairs also cover the behaviour that is measured.

Reward of one answer, in the simulator's terms (`metrics.score_sample`):

    + 1.0 task completed (the cabin ends as the target turn leaves it)
    + 0.5 step completeness (share of the target's tokens present; acting targets only)
    - 1.0 any guardrail violation
    - 0.5 over-trigger (acting where the target is <noop>)
    - 0.5 malformed (rejected by the cabin executor)
    - 0.25 a conflict or an inversion in the sequence
    - 0.05 per step more or fewer than the target takes

A sample gives a pair only when its best and worst well-formed answers differ in reward (ties carry
no preference; a malformed answer has no token sequence to train on).
"""

from __future__ import annotations

import functools
import json
from typing import Sequence

import jax
import ml_collections
import numpy as np

from vlacabin_jax.data.actions import ActionVocabulary
from vlacabin_jax.eval import metrics, simulator
from vlacabin_jax.eval.evaluate import batches
from vlacabin_jax.eval.metrics import Prediction
from vlacabin_jax.model import functional
from vlacabin_jax.model.vla_cabin import VLACabin

REWARD_WEIGHTS = {"success": 1.0, "completeness": 0.5, "violation": -1.0, "over_trigger": -0.5,
                  "invalid": -0.5, "conflict_or_inversion": -0.25, "step_error": -0.05}


def reward(record: dict) -> float:
    """The scalar reward of one scored answer (a `metrics.score_sample` record); see the module doc."""
    w = REWARD_WEIGHTS
    return (w["success"] * record["success"] + w["completeness"] * (record["completeness"] or 0.0)
            + w["violation"] * record["violation"] + w["over_trigger"] * record["over_trigger"]
            + w["invalid"] * (not record["valid"])
            + w["conflict_or_inversion"] * (record["conflict"] or record["inversion"])
            + w["step_error"] * abs(record["steps"] - record["target_steps"]))


@functools.lru_cache(maxsize=4)
def _sample_jit(model_json: str, steps: int, noise_scale: float):
    c = ml_collections.ConfigDict({"model": json.loads(model_json)})

    def run(trainable, frozen, batch, key):
        return functional.build_model(c).apply(
            {"params": functional.merge_params(trainable, frozen)}, batch, steps, noise_scale,
            rngs={"latent": key}, method=VLACabin.sample_actions)

    return jax.jit(run)


def sample_candidates(trainable, frozen, cfg: ml_collections.ConfigDict, samples: Sequence[dict], k: int,
                      noise_scale: float, steps: int | None = None, seed: int = 0, batch_size: int = 32,
                      vocab: ActionVocabulary | None = None) -> list[list[Prediction]]:
    """K answers per sample: draw 0 noise-free, draws 1..K-1 with the variational noise x noise_scale.

    Returns:
      [len(samples)][k] Predictions (decoded tokens; `error` set for a malformed row).
    """
    vocab = vocab or simulator.schema_vocabulary()
    steps = int(steps or cfg.model.dnfm.sample_steps)
    noisy = _sample_jit(cfg.model.to_json_best_effort(sort_keys=True), steps, float(noise_scale))
    exact = _sample_jit(cfg.model.to_json_best_effort(sort_keys=True), steps, 0.0)
    out: list[list[Prediction]] = []
    for b, (batch, n) in enumerate(batches(samples, cfg, batch_size, vocab=vocab)):
        rows = [[] for _ in range(n)]
        for draw in range(k):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), b), draw)
            ids = np.asarray(jax.device_get((exact if draw == 0 else noisy)(trainable, frozen, batch, key)))
            for i in range(n):
                tokens, error = simulator.decode(ids[i], vocab)
                rows[i].append(Prediction(tuple(tokens), None, error))
        out += rows
    return out


def pair(sample: dict, candidates: Sequence[Prediction]) -> dict | None:
    """The sample with `chosen` = its best-rewarded candidate and `rejected` = its worst (first of
    equals), their rewards and why the worst fell short; None when fewer than two well-formed
    candidates differ in reward.

    Malformed answers take no part: a pair stores action tokens, and a malformed row has no token
    sequence to store (its decoded tokens are a display reading, not what the model emitted).
    """
    scored = [(reward(metrics.score_sample(sample, c)), c) for c in candidates if c.error is None]
    if not scored:
        return None
    best = max(range(len(scored)), key=lambda i: scored[i][0])
    worst = min(range(len(scored)), key=lambda i: scored[i][0])
    if scored[best][0] <= scored[worst][0]:
        return None
    w, l = scored[best][1], scored[worst][1]
    rec = metrics.score_sample(sample, l)
    why = [name for name in REJECT_REASONS if rec[name]]
    why = why or ["wrong end state" if not rec["success"] else "steps"]
    return dict(sample, chosen=list(w.actions), rejected=list(l.actions), reason=", ".join(why),
                chosen_reward=float(scored[best][0]), rejected_reward=float(scored[worst][0]))


REJECT_REASONS = ("violation", "over_trigger", "under_trigger", "conflict", "inversion")


def make_pairs(samples: Sequence[dict], candidates: Sequence[Sequence[Prediction]],
               rejected_for: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Best-vs-worst pairs of every sample that has a preference, and counts of what was found.

    `rejected_for` (names of `REJECT_REASONS`) keeps only the pairs whose rejected answer shows one
    of them, e.g. ("violation", "over_trigger") for pairs that teach what not to do: best-vs-worst
    pairs of a policy that mostly under-acts are mostly "act" vs "<noop>", which teach it to act.
    Returns:
      (pairs, {"samples", "pairs", "chosen_success", "rejected_violation", "rejected_over_trigger",
      "distinct_answers_mean"}).
    """
    pairs = []
    distinct = []
    for s, cands in zip(samples, candidates):
        distinct.append(len({c.actions for c in cands}))
        p = pair(s, cands)
        if p is not None and (not rejected_for or any(r in p["reason"].split(", ") for r in rejected_for)):
            pairs.append(p)
    stats = {"samples": len(samples), "pairs": len(pairs),
             "distinct_answers_mean": float(np.mean(distinct)) if distinct else 0.0,
             "chosen_success": sum(metrics.score_sample(p, Prediction(tuple(p["chosen"])))["success"] for p in pairs),
             "rejected_violation": sum("violation" in p["reason"] for p in pairs),
             "rejected_over_trigger": sum("over_trigger" in p["reason"] for p in pairs)}
    return pairs, stats
