"""Evaluation metrics of VLA-Cabin (proposal §4.2), as pure functions over predictions.

Per sample (`score_sample`), each prediction is run through the cabin simulator next to the
target, then `aggregate` turns the per-sample records into rates. Definitions:

  success_rate            the predicted turn is well formed and leaves the cabin's devices exactly
                          as the target turn does (single-turn: samples without history;
                          multi-turn: samples whose request follows an earlier turn)
  clean_success_rate      success and no guardrail violation, conflict or inversion on the way
  avg_steps               device actions per predicted turn (`<noop>` and rejected turns: 0);
                          avg_target_steps is the same for the targets
  over_trigger_rate       among samples whose target is `<noop>`: the prediction acts
  under_trigger_rate      among samples whose target acts: the prediction does nothing or is rejected
  scene_hit_rate          among scene-mode requests (cabin.SCENES) the target runs: after the
                          predicted turn the scene is in force (`cabin.scene_steps` has nothing left)
  step_completeness       among samples whose target acts: mean fraction of target tokens predicted
  inversion_rate / conflict_rate / violation_rate
                          fraction of samples whose predicted turn has at least one
  invalid_rate            fraction of predictions rejected as malformed sequences
  explanation_token_accuracy
                          position-wise accuracy over the target's tokens after `<bos>` (through `<eos>`)
  explanation_bleu        corpus BLEU-4 (add-one smoothed for n > 1) of the explanation content tokens

A rate whose denominator is empty is None. Retrieval R@k from latent arrays: `retrieval_metrics`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Hashable, Iterable, Sequence

import numpy as np

from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import NOOP, SCHEMA, split_token
from vlacabin_jax.data.policy import FOLLOW_UPS
from vlacabin_jax.data.spec import MODALITIES
from vlacabin_jax.eval import simulator

# Action families for the confusion view: the schema's device groups, plus the special outcomes.
FAMILY_OF_PATH: dict[str, str] = {path: dev.group for dev in SCHEMA for path, _ in dev.paths()}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(dev.group for dev in SCHEMA)) + ("noop", "invalid", "none")
GROUPS = ("scene_mode", "single", "follow_up")
# Modality pairs whose cross-modal retrieval is reported (both directions).
RETRIEVAL_PAIRS = (("text", "video"), ("speech", "text"), ("state", "text"))
TEXT_PAD_ID, TEXT_BOS_ID, TEXT_EOS_ID = 0, 1, 2  # cfg.model.text_{pad,bos,eos}_id


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predicted turn.

    actions: decoded action tokens (for a rejected model output, a best-effort reading).
    explanation: predicted explanation ids `<bos> … <eos> <pad>…`, or None when the policy gives none.
    error: why the raw output was rejected as malformed (nothing is executed), else None.
    """

    actions: tuple[str, ...]
    explanation: tuple[int, ...] | None = None
    error: str | None = None


def request_group(scene: str) -> str:
    """"scene_mode", "follow_up" or "single" for a sample's request type."""
    return "scene_mode" if scene in cabin.SCENES else "follow_up" if scene in FOLLOW_UPS else "single"


def families(tokens: Sequence[str], error: str | None = None) -> frozenset[str]:
    """The action families a turn touches ({"noop"} for `<noop>`, {"invalid"} when rejected)."""
    if error is not None:
        return frozenset({"invalid"})
    if list(tokens) == [NOOP]:
        return frozenset({"noop"})
    return frozenset(FAMILY_OF_PATH.get(split_token(t)[0], "invalid") for t in tokens)


def explanation_content(ids: Sequence[int] | None, bos: int = TEXT_BOS_ID, eos: int = TEXT_EOS_ID,
                        pad: int = TEXT_PAD_ID) -> tuple[int, ...]:
    """The words of an explanation row: after a leading `<bos>`, up to `<eos>`, `<pad>` dropped."""
    ids = [int(i) for i in (ids or ())]
    if ids and ids[0] == bos:
        ids = ids[1:]
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return tuple(i for i in ids if i != pad)


def token_accuracy(reference: Sequence[int], hypothesis: Sequence[int], bos: int = TEXT_BOS_ID,
                   eos: int = TEXT_EOS_ID, pad: int = TEXT_PAD_ID) -> tuple[int, int]:
    """(matching positions, target positions) over the reference's tokens after `<bos>` through
    its `<eos>` (or its end); the hypothesis is compared position by position, padded with `<pad>`."""
    ref = [int(i) for i in reference]
    start = 1 if ref and ref[0] == bos else 0
    end = ref.index(eos) + 1 if eos in ref else len([i for i in ref if i != pad])
    hyp = [int(i) for i in hypothesis]
    hyp += [pad] * max(0, end - len(hyp))
    return sum(ref[i] == hyp[i] for i in range(start, end)), max(0, end - start)


def _ngrams(seq: Sequence[int], n: int) -> collections.Counter:
    return collections.Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def bleu(references: Sequence[Sequence[int]], hypotheses: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Corpus BLEU of token sequences (one reference each): clipped n-gram precisions, n ≤ max_n,
    add-one smoothed for n > 1 (short explanations often lack 4-grams), times the brevity penalty."""
    matches, totals = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        ref_len, hyp_len = ref_len + len(ref), hyp_len + len(hyp)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    logp = [math.log(matches[0] / totals[0])]
    logp += [math.log((matches[n] + 1) / (totals[n] + 1)) for n in range(1, max_n)]
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(sum(logp) / max_n)


def scene_in_force(scene: str, state: cabin.CabinState) -> bool:
    """Whether scene mode `scene` holds in `state`: it is not declined and no step is left to do."""
    steps, decline = cabin.scene_steps(scene, state)
    return decline is None and not any(tokens for _, tokens in steps)


def score_sample(sample: dict, pred: Prediction, target_explanation: Sequence[int] | None = None) -> dict:
    """Run a prediction and the sample's target through the simulator → a per-sample record.

    Args:
      sample: a VLA sample of `world.generate` (needs state, actions, scene, history).
      pred: the predicted turn.
      target_explanation: the target explanation ids (`<bos> … <eos>`), or None.
    """
    state = simulator.sample_state(sample)
    target_tokens = tuple(sample["actions"])
    target = simulator.simulate(state, target_tokens)
    if target.error:
        raise ValueError(f"sample {sample.get('sample_id')}: malformed target {target_tokens}: {target.error}")
    if pred.error is not None:
        rep = simulator.SimulationReport(state, state, tuple(pred.actions), (), (), (), (), pred.error)
    else:
        rep = simulator.simulate(state, pred.actions)
    scene = sample["scene"]
    target_noop = target_tokens == (NOOP,)
    acted = rep.valid and rep.n_actions > 0
    success = rep.valid and rep.final.devices == target.final.devices
    rec = {
        "sample_id": sample.get("sample_id"), "scene": scene, "group": request_group(scene),
        "multi_turn": bool(sample.get("history")), "valid": rep.valid, "success": success,
        "clean_success": success and rep.ok, "steps": rep.n_actions, "target_steps": target.n_actions,
        "target_noop": target_noop, "over_trigger": target_noop and acted,
        "under_trigger": (not target_noop) and not acted,
        "completeness": None if target_noop else
        sum(t in rep.tokens for t in target_tokens) / len(target_tokens) if rep.valid else 0.0,
        "scene_hit": (scene_in_force(scene, rep.final) if rep.valid else False)
        if scene in cabin.SCENES and not target_noop else None,
        "violation": bool(rep.violations), "conflict": bool(rep.conflicts), "inversion": bool(rep.inversions),
        "target_families": families(target_tokens), "pred_families": families(rep.tokens, rep.error),
        "expl_matches": None, "expl_count": None, "expl_ref": None, "expl_hyp": None,
    }
    if pred.explanation is not None and target_explanation is not None:
        rec["expl_matches"], rec["expl_count"] = token_accuracy(target_explanation, pred.explanation)
        rec["expl_ref"] = explanation_content(target_explanation)
        rec["expl_hyp"] = explanation_content(pred.explanation)
    return rec


def _mean(values: Iterable) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def aggregate(records: Sequence[dict]) -> dict:
    """Per-sample records (`score_sample`) → the metric dict (see the module docstring)."""
    single = [r for r in records if not r["multi_turn"]]
    multi = [r for r in records if r["multi_turn"]]
    noop_t = [r for r in records if r["target_noop"]]
    acts_t = [r for r in records if not r["target_noop"]]
    expl = [r for r in records if r["expl_count"] is not None]
    out = {
        "n": len(records), "n_single_turn": len(single), "n_multi_turn": len(multi),
        "success_rate": _mean(r["success"] for r in records),
        "clean_success_rate": _mean(r["clean_success"] for r in records),
        "single_turn_success_rate": _mean(r["success"] for r in single),
        "multi_turn_success_rate": _mean(r["success"] for r in multi),
        "avg_steps": _mean(r["steps"] for r in records),
        "avg_target_steps": _mean(r["target_steps"] for r in records),
        "over_trigger_rate": _mean(r["over_trigger"] for r in noop_t),
        "under_trigger_rate": _mean(r["under_trigger"] for r in acts_t),
        "scene_hit_rate": _mean(r["scene_hit"] for r in records if r["scene_hit"] is not None),
        "step_completeness": _mean(r["completeness"] for r in acts_t),
        "inversion_rate": _mean(r["inversion"] for r in records),
        "conflict_rate": _mean(r["conflict"] for r in records),
        "violation_rate": _mean(r["violation"] for r in records),
        "invalid_rate": _mean(not r["valid"] for r in records),
        "explanation_token_accuracy": None, "explanation_bleu": None,
    }
    if expl:
        out["explanation_token_accuracy"] = (sum(r["expl_matches"] for r in expl)
                                             / max(1, sum(r["expl_count"] for r in expl)))
        out["explanation_bleu"] = bleu([r["expl_ref"] for r in expl], [r["expl_hyp"] for r in expl])
    return out


def confusion(records: Sequence[dict]) -> dict:
    """Action-family confusion: rows = target families, columns = predicted families (`FAMILIES`).

    A family in both target and prediction counts on the diagonal. A target family the prediction
    misses is spread evenly over the families the prediction has instead (or "none"); a predicted
    family with nothing missed counts in the "none" row. So each target family's row sums to the
    number of samples whose target touches it.
    Returns {"labels": [str], "matrix": [[float]]}.
    """
    idx = {f: i for i, f in enumerate(FAMILIES)}
    m = np.zeros((len(FAMILIES), len(FAMILIES)))
    none = idx["none"]
    for r in records:
        t, p = r["target_families"], r["pred_families"]
        for f in t & p:
            m[idx[f], idx[f]] += 1
        missed, extra = sorted(t - p), sorted(p - t)
        for f in missed:
            for g in extra or ["none"]:
                m[idx[f], idx[g]] += 1 / max(1, len(extra))
        if not missed:
            for g in extra:
                m[none, idx[g]] += 1
    return {"labels": list(FAMILIES), "matrix": m.round(6).tolist()}


def compute_metrics(samples: Sequence[dict], predictions: Sequence[Prediction],
                    target_explanations: Sequence[Sequence[int] | None] | None = None) -> dict:
    """All action/explanation metrics of an evaluation set, overall and per request type.

    Args:
      samples: VLA samples; predictions: one `Prediction` each; target_explanations: one target
        explanation id row each (or None: no explanation metrics).
    Returns:
      {"overall": metrics, "per_scene": {request type: metrics}, "per_group": {group: metrics},
       "confusion": confusion(...)}; scenes and groups with no samples are left out.
    """
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    targets = target_explanations if target_explanations is not None else [None] * len(samples)
    records = [score_sample(s, p, t) for s, p, t in zip(samples, predictions, targets)]
    by_scene: dict[str, list[dict]] = collections.defaultdict(list)
    by_group: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        by_scene[r["scene"]].append(r)
        by_group[r["group"]].append(r)
    return {"overall": aggregate(records),
            "per_scene": {k: aggregate(v) for k, v in sorted(by_scene.items())},
            "per_group": {g: aggregate(by_group[g]) for g in GROUPS if by_group[g]},
            "confusion": confusion(records)}


def failures(samples: Sequence[dict], predictions: Sequence[Prediction], limit: int = 10) -> list[dict]:
    """The first `limit` unsuccessful predictions with what `cabin.check` finds wrong with them."""
    out = []
    for s, p in zip(samples, predictions):
        if len(out) >= limit:
            break
        rec = score_sample(s, p)
        if rec["clean_success"]:
            continue
        if p.error:
            issues = [f"rejected: {p.error}"]
        elif (invalid := simulator.validate(p.actions)) is not None:
            issues = [f"invalid: {invalid}"]
        else:
            issues = cabin.check(simulator.sample_state(s), p.actions, reference=s["actions"])
        if rec["valid"] and not rec["success"]:
            issues.append("end state differs from the target's")
        out.append({"sample_id": s.get("sample_id"), "scene": s["scene"], "text": s.get("text", ""),
                    "history": list(s.get("history") or []), "target": list(s["actions"]),
                    "predicted": list(p.actions), "issues": issues})
    return out


# ---------------------------------------------------------------- cross-modal retrieval
def recall_at_k(queries: np.ndarray, keys: np.ndarray, query_labels: Sequence[Hashable],
                key_labels: Sequence[Hashable], ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """R@k of cosine-similarity retrieval.

    Args:
      queries: [n, d]; keys: [m, d]; a key is a correct answer to a query when their labels are
        equal (so duplicates, e.g. two samples with the same caption, both count).
    Returns:
      {k: fraction of queries (that have a correct key) whose best correct key ranks < k among the
      incorrect ones}. Ties count against the query, so collapsed latents score 0, not 1.
    """
    q = np.asarray(queries, np.float64)
    k_ = np.asarray(keys, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k_ = k_ / np.maximum(np.linalg.norm(k_, axis=-1, keepdims=True), 1e-12)
    ids: dict[Hashable, int] = {}
    ql = np.array([ids.setdefault(x, len(ids)) for x in query_labels])
    kl = np.array([ids.setdefault(x, len(ids)) for x in key_labels])
    sim = q @ k_.T  # [n, m]
    correct = ql[:, None] == kl[None, :]
    has = correct.any(1)
    if not has.any():
        return {k: None for k in ks}
    best = np.where(correct, sim, -np.inf).max(1, keepdims=True)
    rank = ((sim >= best) & ~correct).sum(1)[has]
    return {k: float(np.mean(rank < k)) for k in ks}


def retrieval_metrics(pooled: np.ndarray, present: np.ndarray, labels: Sequence[Hashable],
                      pairs: Sequence[tuple[str, str]] = RETRIEVAL_PAIRS, ks: Sequence[int] = (1, 5),
                      modalities: Sequence[str] = MODALITIES) -> dict[str, float | int | None]:
    """Cross-modal retrieval from the unified latent, both directions of every pair.

    Args:
      pooled: [n, n_modalities, d] pooled latent means (modality axis in `modalities` order).
      present: [n, n_modalities] bool, which modalities each sample has.
      labels: per sample, what makes two samples the same answer (e.g. the text).
      pairs: (a, b) modality names; only samples having both take part (queries and keys).
    Returns:
      {"a->b/R@k": float, "b->a/R@k": float, "a-b/n": int} (None rates when fewer than 2 samples).
    """
    pooled, present = np.asarray(pooled), np.asarray(present, bool)
    out: dict[str, float | int | None] = {}
    for a, b in pairs:
        i, j = modalities.index(a), modalities.index(b)
        rows = np.flatnonzero(present[:, i] & present[:, j])
        lab = [labels[r] for r in rows]
        out[f"{a}-{b}/n"] = int(len(rows))
        for src, dst, x, y in ((a, b, i, j), (b, a, j, i)):
            r = recall_at_k(pooled[rows, x], pooled[rows, y], lab, lab, ks) if len(rows) > 1 else \
                {k: None for k in ks}
            out.update({f"{src}->{dst}/R@{k}": v for k, v in r.items()})
    return out
