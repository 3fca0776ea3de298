"""Evaluate a policy (the model, the rule-based oracle, a random baseline) on a cabin evaluation set.

    eval_samples(cfg, n, kind="vla", split="heldout")          -> samples of the synthetic world
    evaluate_policy(predict_fn, samples, cfg)                   -> metrics (any policy)
    evaluate_model(trainable, frozen, cfg, samples, steps)      -> metrics (+ cross-modal retrieval)
    latency(trainable, frozen, cfg, samples, batch_sizes)       -> P50/P95 of compiled `infer`
    evaluate_entry("runs/demo/checkpoints" | "oracle" | ..., cfg, samples) -> metrics + meta

The evaluation set follows the data pipeline's split convention: "heldout" is world indices
`pipeline.HELDOUT_OFFSET + i` (never a training sample), "train" is indices `i`. Multi-turn
samples are those with an earlier turn (`history`). Metric definitions: `metrics.py`.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlacabin_jax.data import features, pipeline, world
from vlacabin_jax.data.actions import NOOP, ActionVocabulary
from vlacabin_jax.data.spec import MODALITIES
from vlacabin_jax.eval import metrics, simulator
from vlacabin_jax.eval.metrics import Prediction
from vlacabin_jax.model import functional
from vlacabin_jax.model.vla_cabin import VLACabin, pooled_means

PredictFn = Callable[[Sequence[dict]], Sequence[Prediction]]
# Which data kind each retrieval pair is measured on: the kind whose two modalities describe the
# same thing (a caption and its clip, a transcript and its voice, a request and its cabin).
RETRIEVAL_KIND = {("text", "video"): "video_text", ("speech", "text"): "speech_text", ("state", "text"): "vla"}
_HOST_ONLY = ("sample_id",)  # int64 bookkeeping, not a model input


# ---------------------------------------------------------------- evaluation set
def eval_samples(cfg: ml_collections.ConfigDict, num_samples: int, kind: str = "vla",
                 split: str = "heldout", start: int = 0) -> list[dict]:
    """`num_samples` samples of `kind` from the synthetic world, in index order.

    Args:
      split: "heldout" (indices HELDOUT_OFFSET + start + i, disjoint from training) or "train".
    """
    if split not in ("heldout", "train"):
        raise ValueError(f"split {split!r}: use 'heldout' or 'train'")
    p = pipeline.synthetic_params(cfg)
    offset = pipeline.HELDOUT_OFFSET if split == "heldout" else 0
    return [world.generate(p["seed"], offset + start + i, kind, p["image_size"], p["num_frames"],
                           p["n_mels"], p["mel_frames"]) for i in range(num_samples)]


def explanation_row(sample: dict, cfg, tokenizer, vocab: ActionVocabulary, text: str | None = None
                    ) -> tuple[int, ...] | None:
    """The explanation ids `<bos> … <eos>` that `features.featurize` makes of `text` (default: the
    sample's own explanation), or None when there is none."""
    s = sample if text is None else dict(sample, explanation=text)
    f = features.featurize(s, cfg, tokenizer, vocab)
    ids = f["explanation_tokens"][f["explanation_mask"]]
    return tuple(int(i) for i in ids) if len(ids) else None


# ---------------------------------------------------------------- policies
def oracle_policy(cfg, tokenizer=None, vocab: ActionVocabulary | None = None) -> PredictFn:
    """The rule-based policy's own answers (the targets) and explanations: the upper bound."""
    tokenizer = tokenizer or features.load_tokenizer()
    vocab = vocab or simulator.schema_vocabulary()

    def predict(samples: Sequence[dict]) -> list[Prediction]:
        return [Prediction(tuple(s["actions"]), explanation_row(s, cfg, tokenizer, vocab)) for s in samples]

    return predict


def random_policy(cfg, seed: int = 0, tokenizer=None, vocab: ActionVocabulary | None = None,
                  noop_prob: float = 0.3, max_actions: int = 4) -> PredictFn:
    """A baseline that ignores the request: `<noop>` with `noop_prob`, else 1..max_actions device
    tokens drawn uniformly; the explanation of another sample of the set. Deterministic in `seed`
    and the sample ids."""
    tokenizer = tokenizer or features.load_tokenizer()
    vocab = vocab or simulator.schema_vocabulary()
    device_tokens = [t for t in vocab.tokens if "=" in t]

    def predict(samples: Sequence[dict]) -> list[Prediction]:
        out = []
        for i, s in enumerate(samples):
            rng = np.random.default_rng([seed, int(s.get("sample_id", i))])
            if rng.random() < noop_prob:
                acts = (NOOP,)
            else:
                n = int(rng.integers(1, max_actions + 1))
                acts = tuple(device_tokens[j] for j in rng.integers(len(device_tokens), size=n))
            other = samples[int(rng.integers(len(samples)))]
            out.append(Prediction(acts, explanation_row(s, cfg, tokenizer, vocab, other.get("explanation") or "")))
        return out

    return predict


def evaluate_policy(predict_fn: PredictFn, samples: Sequence[dict], cfg, tokenizer=None,
                    vocab: ActionVocabulary | None = None, num_failures: int = 10) -> dict:
    """Metrics of any policy on VLA samples.

    Returns:
      `metrics.compute_metrics(...)` plus "failures" (the first `num_failures` unsuccessful
      predictions with their issues).
    """
    tokenizer = tokenizer or features.load_tokenizer()
    vocab = vocab or simulator.schema_vocabulary()
    preds = list(predict_fn(samples))
    targets = [explanation_row(s, cfg, tokenizer, vocab) for s in samples]
    out = metrics.compute_metrics(samples, preds, targets)
    out["failures"] = metrics.failures(samples, preds, num_failures)
    return out


# ---------------------------------------------------------------- the model
def _key(cfg) -> str:
    """The model config as canonical JSON: what decides which compiled program a call needs."""
    return cfg.model.to_json_best_effort(sort_keys=True)


def infer_fn(cfg: ml_collections.ConfigDict, steps: int | None = None) -> Callable:
    """jit(`functional.infer`) for this config and DNFM step count, shared by every call with the
    same model config (the trainer's periodic eval and `latency` reuse one compiled program):
    (trainable, frozen, batch) -> (action ids [b, action_len], explanation ids [b, explain_len])."""
    return _infer_jit(_key(cfg), steps)


@functools.lru_cache(maxsize=8)
def _infer_jit(model_json: str, steps: int | None) -> Callable:
    c = ml_collections.ConfigDict({"model": json.loads(model_json)})
    return jax.jit(lambda p, f, b: functional.infer(p, f, b, c, steps))


def encode_fn(cfg: ml_collections.ConfigDict) -> Callable:
    """jit of `VLACabin.encode` pooled per modality, shared like `infer_fn`:
    (trainable, frozen, batch) -> (pooled [b, n_modalities, d_latent] float32, present [b, n_modalities] bool)."""
    return _encode_jit(_key(cfg))


@functools.lru_cache(maxsize=8)
def _encode_jit(model_json: str) -> Callable:
    c = ml_collections.ConfigDict({"model": json.loads(model_json)})

    def encode(p, f, b):
        enc = functional.build_model(c).apply({"params": functional.merge_params(p, f)}, b,
                                              method=VLACabin.encode)
        # Masked mean over each modality's latent tokens: what the training InfoNCE compares.
        return pooled_means(c.model, enc["mean"], enc["mask"]), enc["present"]

    return jax.jit(encode)


def random_init(cfg: ml_collections.ConfigDict, seed: int = 0) -> tuple[dict, dict]:
    """Untrained (trainable, frozen) params, unboxed, the anchor in `model.anchor_dtype` as in training."""
    trainable, frozen = functional.init_params(cfg, jax.random.key(seed))
    anchor = jnp.dtype(cfg.model.anchor_dtype)
    return nn.unbox(trainable), jax.tree.map(lambda x: x.astype(anchor), nn.unbox(frozen))


def batches(samples: Sequence[dict], cfg, batch_size: int, tokenizer=None,
            vocab: ActionVocabulary | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Featurized batches of exactly `batch_size` rows (the last one padded by repeating its last
    sample, so one compiled program serves all) → (batch without host-only fields, real rows)."""
    tokenizer = tokenizer or features.load_tokenizer()
    vocab = vocab or simulator.schema_vocabulary()
    for lo in range(0, len(samples), batch_size):
        chunk = list(samples[lo:lo + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        rows = [features.featurize(s, cfg, tokenizer, vocab) for s in chunk]
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in _HOST_ONLY}, n


def predict_model(trainable, frozen, cfg, samples: Sequence[dict], steps: int | None = None,
                  batch_size: int = 32, tokenizer=None, vocab: ActionVocabulary | None = None
                  ) -> tuple[list[Prediction], list[tuple[int, ...] | None]]:
    """Run `infer` over the samples → (predictions, target explanation rows)."""
    vocab = vocab or simulator.schema_vocabulary()
    fn = infer_fn(cfg, steps)
    preds, targets = [], []
    for batch, n in batches(samples, cfg, batch_size, tokenizer, vocab):
        acts, expl = jax.device_get(fn(trainable, frozen, batch))
        for i in range(n):
            tokens, error = simulator.decode(acts[i], vocab)
            preds.append(Prediction(tuple(tokens), tuple(int(x) for x in expl[i]), error))
            m = batch["explanation_mask"][i]
            targets.append(tuple(int(x) for x in batch["explanation_tokens"][i][m]) if m.any() else None)
    return preds, targets


def _label(sample: dict) -> str:
    """What makes two samples the same answer in retrieval: the full text (history and request)."""
    return "\n".join(list(sample.get("history") or []) + [sample.get("text") or ""])


def retrieval(trainable, frozen, cfg, samples: Sequence[dict], batch_size: int = 32, pool: int = 256,
              tokenizer=None) -> dict:
    """Cross-modal R@1/R@5 from the unified latent (`metrics.retrieval_metrics`), each pair of
    `RETRIEVAL_KIND` on the first `pool` samples of its kind that have both modalities."""
    fn = encode_fn(cfg)
    pooled, present = [], []
    for batch, n in batches(samples, cfg, batch_size, tokenizer):
        p, m = jax.device_get(fn(trainable, frozen, batch))
        pooled.append(np.asarray(p[:n], np.float32))
        present.append(np.asarray(m[:n], bool))
    pooled, present = np.concatenate(pooled), np.concatenate(present)
    out = {}
    for (a, b), kind in RETRIEVAL_KIND.items():
        rows = [i for i, s in enumerate(samples) if s["kind"] == kind
                and present[i, MODALITIES.index(a)] and present[i, MODALITIES.index(b)]][:pool]
        out.update(metrics.retrieval_metrics(pooled[rows], present[rows], [_label(samples[i]) for i in rows],
                                             pairs=((a, b),)))
    return out


def evaluate_model(trainable, frozen, cfg, samples: Sequence[dict], steps: int | None = None,
                   batch_size: int = 32, retrieval_samples: Sequence[dict] = (), retrieval_pool: int = 256,
                   tokenizer=None, vocab: ActionVocabulary | None = None, num_failures: int = 10) -> dict:
    """Metrics of the model on VLA samples, plus retrieval over `samples` + `retrieval_samples`
    (pass video_text and speech_text samples for the text↔video and speech↔text pairs).

    Args:
      trainable, frozen: unboxed param trees (as restored, or `random_init`).
      steps: DNFM sampler steps K (default `cfg.model.dnfm.sample_steps`).
      batch_size: rows per compiled call (the last batch is padded).
    Returns:
      `compute_metrics` output + "failures" + "retrieval" (`retrieval` output).
    """
    tokenizer = tokenizer or features.load_tokenizer()
    preds, targets = predict_model(trainable, frozen, cfg, samples, steps, batch_size, tokenizer, vocab)
    out = metrics.compute_metrics(samples, preds, targets)
    out["failures"] = metrics.failures(samples, preds, num_failures)
    out["retrieval"] = retrieval(trainable, frozen, cfg, list(samples) + list(retrieval_samples), batch_size,
                                 retrieval_pool, tokenizer)
    return out


def latency(trainable, frozen, cfg, samples: Sequence[dict], batch_sizes: Sequence[int] = (1, 32),
            iters: int = 50, warmup: int = 5, steps: int | None = None, tokenizer=None) -> dict:
    """Wall time of one compiled `infer` call per batch size, on the default device.

    Params and the batch are put on the device first, so what is timed is the model (and the
    result's readiness via `block_until_ready`), not host featurization or transfer. The first
    call (trace + compile, or a persistent-cache load) and `warmup` more calls are not timed.

    Returns:
      {"device": str, "b<size>": {"p50_ms", "p95_ms", "mean_ms", "min_ms", "first_call_s",
       "iters", "samples_per_s"}} (samples_per_s from the median).
    """
    fn = infer_fn(cfg, steps)
    trainable, frozen = jax.device_put((trainable, frozen))
    samples = list(samples[:max(batch_sizes)])
    base, _ = next(batches(samples, cfg, len(samples), tokenizer))
    dev = jax.devices()[0]
    out: dict = {"device": f"{dev.platform}:{dev.device_kind}"}
    for bs in batch_sizes:
        rows = np.arange(bs) % len(samples)  # tile the samples up to the batch size
        batch = jax.device_put({k: v[rows] for k, v in base.items()})
        t0 = time.perf_counter()
        jax.block_until_ready(fn(trainable, frozen, batch))
        first = time.perf_counter() - t0
        for _ in range(warmup):
            jax.block_until_ready(fn(trainable, frozen, batch))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(trainable, frozen, batch))
            times.append(time.perf_counter() - t0)
        ms = np.asarray(times) * 1e3
        p50 = float(np.percentile(ms, 50))
        out[f"b{bs}"] = {"p50_ms": p50, "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
                         "min_ms": float(ms.min()), "first_call_s": first, "iters": iters,
                         "samples_per_s": bs / (p50 / 1e3)}
    return out


# ---------------------------------------------------------------- named entries (tools.evaluate)
SPECIAL = ("oracle", "random", "random-init")  # entries that are not checkpoint directories


def evaluate_entry(entry: str, cfg: ml_collections.ConfigDict, samples: Sequence[dict],
                   retrieval_samples: Sequence[dict] = (), *, step: int | None = None, seed: int = 0,
                   steps: int | None = None, batch_size: int = 32, retrieval_pool: int = 256,
                   num_failures: int = 5, latency_iters: int = 50, split: str = "heldout") -> dict:
    """Results of one entry: "oracle", "random", "random-init" or a checkpoint directory (its
    params restored at `step`, default latest), with `meta` describing the run."""
    from vlacabin_jax.train.restore import restore_params

    t0 = time.perf_counter()
    if entry in ("oracle", "random"):
        fn = oracle_policy(cfg) if entry == "oracle" else random_policy(cfg, seed=seed)
        res = evaluate_policy(fn, samples, cfg, num_failures=num_failures)
    else:
        if entry == "random-init":
            trainable, frozen = random_init(cfg, seed)
        else:
            trainable, frozen = restore_params(entry, cfg, step)
        res = evaluate_model(trainable, frozen, cfg, samples, steps=steps, batch_size=batch_size,
                             retrieval_samples=retrieval_samples, retrieval_pool=retrieval_pool,
                             num_failures=num_failures)
        if latency_iters > 0:
            res["latency"] = latency(trainable, frozen, cfg, samples, (1, batch_size), iters=latency_iters,
                                     steps=steps)
    res["meta"] = {"policy": entry, "variant": cfg.variant, "split": split, "num_samples": len(samples),
                   "steps": steps or int(cfg.model.dnfm.sample_steps),
                   "seconds": round(time.perf_counter() - t0, 2)}
    return res


def entry_names(entries: Sequence[str]) -> list[str]:
    """Short labels: the run's name for `<run>/checkpoints`, else the directory's own name; two
    equal names become `A-name`, `B-name`."""
    def name(entry: str) -> str:
        if entry in SPECIAL:
            return entry
        p = Path(entry).resolve()
        return p.parent.name if p.name == "checkpoints" else p.name

    names = [name(e) for e in entries]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"A-{names[0]}", f"B-{names[1]}"]
    return names


def default_out(entries: Sequence[str], names: Sequence[str]) -> Path:
    """`<run>/eval` for a run's `checkpoints/` directory, else `runs/eval/<names>` (runs/ is ignored by git)."""
    if len(entries) == 1 and entries[0] not in SPECIAL and Path(entries[0]).resolve().name == "checkpoints":
        return Path(entries[0]).resolve().parent / "eval"
    return Path("runs", "eval", "_vs_".join(names))
