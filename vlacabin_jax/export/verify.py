"""Three-way parity of an export: the same inputs through JAX, the PyTorch mirror and ONNX Runtime.

    ref = JaxReference(cfg, trainable, frozen, steps)
    report = verify(ref, mirror, {"fp32": "m.fp32.onnx", "fp16": "m.fp16.onnx"}, inputs)

The reference is the Flax model itself run in float32 (compute dtype and anchor params float32):
`functional.infer` for the tokens, and the same modules (`VLACabin.encode`, `.context`,
`dnfm.euler_sample` over `.dnfm` with the connector memory, `.dnfm.logits`) for the continuous
outputs; `dnfm.decode_actions` of those logits must give `infer`'s actions (the reference checks
itself). The inputs are random batches with missing modalities, padding and action logs of every
shape (none, executed actions, a `<noop>` turn), plus real samples of the synthetic cabin world,
follow-up turns with a non-empty action log among them.

Tolerances (stated in every report):
  float32 (PyTorch mirror, ONNX fp32): every float output max |a - b| <= 1e-4, and on z0, the
    velocities and x1 also max |a - b| / max |ref| <= 1e-5 (when max |ref| >= 1e-3); action and
    explanation tokens identical.
  float16 (ONNX fp16): every float output max |a - b| <= 2e-2 * max(1, max |ref|); action tokens
    and explanation tokens each agree on >= 99% of positions.
  Logits the per-setting layout forbids (float32's minimum in the reference) must be that value
  exactly; the figures above are over the other entries, so the minimum does not scale fp16's atol.
ONNX Runtime is run at batch 1 (each of the first samples alone) and at the whole batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import numpy as np

from vlacabin_jax.export.torch_model import INPUT_NAMES

FLOAT_OUTPUTS = ("z0", "velocities", "x1", "action_logits", "context")
TOKEN_OUTPUTS = ("action_tokens", "explanation_tokens")
RELATIVE_OUTPUTS = ("z0", "velocities", "x1")
RELATIVE_FLOOR = 1e-3  # below this max |ref| the relative check is reported, not applied
# `DNFM.logits` under the per-setting layout: the logit of an id another setting path owns.
FORBIDDEN_LOGIT = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What counts as agreement with the JAX reference (see the module docstring)."""

    name: str
    atol: float  # max abs difference of every float output ...
    atol_scaled: bool  # ... times max(1, max |ref|) when True
    rtol: float | None  # max abs difference / max |ref| on RELATIVE_OUTPUTS (None: not checked)
    token_agreement: float  # minimum fraction of equal token positions (1.0: identical)

    def describe(self) -> str:
        scale = " x max(1, max|ref|)" if self.atol_scaled else ""
        rel = f"; max|a-b|/max|ref| <= {self.rtol:g} on {', '.join(RELATIVE_OUTPUTS)}" if self.rtol else ""
        tokens = "identical" if self.token_agreement >= 1.0 else f">= {self.token_agreement:.0%} agreement"
        return f"float outputs max|a-b| <= {self.atol:g}{scale}{rel}; tokens {tokens}"


FP32 = Tolerance("float32", atol=1e-4, atol_scaled=False, rtol=1e-5, token_agreement=1.0)
FP16 = Tolerance("float16", atol=2e-2, atol_scaled=True, rtol=None, token_agreement=0.99)


class VerificationError(RuntimeError):
    """The export disagrees with JAX beyond the stated tolerances."""


# --------------------------------------------------------------------------------------- JAX


class JaxReference:
    """The Flax model in float32 as the ground truth; compiled once per batch size.

    Args:
      cfg: the full config the params belong to (any compute/anchor dtype; float32 is used here).
      trainable, frozen: unboxed param trees (numpy or JAX arrays; a bf16 anchor is widened exactly).
      steps: the sampler's K.
    """

    def __init__(self, cfg: Any, trainable: Any, frozen: Any, steps: int):
        import jax
        import jax.numpy as jnp
        import ml_collections

        from vlacabin_jax.model import dnfm, functional
        from vlacabin_jax.model.vla_cabin import VLACabin

        cfg32 = ml_collections.ConfigDict(cfg.to_dict())
        cfg32.model.dtype = "float32"
        cfg32.model.anchor_dtype = "float32"
        self.cfg, self.steps = cfg32, steps
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        self.trainable, self.frozen = jax.tree.map(f32, trainable), jax.tree.map(f32, frozen)
        model = VLACabin(cfg32.model)

        def intermediates(module, batch):
            enc = module.encode(batch)
            context, z0, _, memory, memory_mask = module.context(batch, enc["mean"], enc["mask"])
            velocities = []

            def velocity(x, t):  # records each step's velocity; the sampler itself is unchanged
                v = module.dnfm(x, t, memory=memory, memory_mask=memory_mask)
                velocities.append(v)
                return v

            x1 = dnfm.euler_sample(velocity, z0, steps)
            logits = module.dnfm.logits(x1)
            return {"z0": z0, "velocities": jnp.stack(velocities, axis=1), "x1": x1,
                    "action_logits": logits, "context": context,
                    "decoded_actions": dnfm.decode_actions(logits, cfg32.model)}

        params = functional.merge_params(self.trainable, self.frozen)
        self._intermediates = jax.jit(lambda p, b: model.apply({"params": p}, b, method=intermediates))
        self._infer = jax.jit(lambda t, f, b: functional.infer(t, f, b, cfg32, steps))
        self._params = params

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batch dict (spec keys; missing target keys are filled with zeros) → numpy outputs."""
        from vlacabin_jax.data.spec import batch_spec

        size = len(batch["text_tokens"])
        full = {k: np.asarray(batch[k]) if k in batch else np.zeros(shape, dtype)
                for k, (shape, dtype) in batch_spec(self.cfg, size).items()}
        out = {k: np.asarray(v) for k, v in self._intermediates(self._params, full).items()}
        actions, explanation = self._infer(self.trainable, self.frozen, full)
        out["action_tokens"], out["explanation_tokens"] = np.asarray(actions), np.asarray(explanation)
        return out


# --------------------------------------------------------------------------------------- inputs


def random_batch(cfg: Any, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random model inputs with the situations inference meets: every modality present (sample 0),
    no speech (1), no video and padded text (2), padded mel and frames (3), no text at all (4),
    no state (5), then alternating. Values cover the input ranges (frames uint8 in [0, 255]). The earlier
    turn's action log cycles over an executed log (sample 0: device ids, `<eos>`, `<pad>`, with
    before-ids under the executed ones), a `<noop>` turn (1) and no earlier turn (2: all `<pad>`)."""
    from vlacabin_jax.data.spec import batch_spec

    rng = np.random.default_rng(seed)
    m = cfg.model
    spec = batch_spec(cfg, batch_size)
    b = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items() if k in INPUT_NAMES}
    b["text_tokens"] = rng.integers(5, m.lm.vocab_size, size=spec["text_tokens"][0]).astype(np.int32)
    b["text_mask"][:] = True
    b["mel"] = rng.normal(size=spec["mel"][0]).astype(np.float32)
    b["mel_mask"][:] = True
    b["frames"] = rng.integers(0, 256, size=spec["frames"][0], dtype=np.uint8)
    b["frame_mask"][:] = True
    b["state_numeric"] = rng.normal(size=spec["state_numeric"][0]).astype(np.float32)
    b["state_categorical"] = np.stack([rng.integers(0, n, size=batch_size) for n in m.state.categorical_sizes],
                                      -1).astype(np.int32)
    b["modality_mask"][:] = True
    b["constraint_tags"] = rng.uniform(size=spec["constraint_tags"][0]) < 0.3
    text_len, mel_frames, frames = b["text_mask"].shape[1], b["mel_mask"].shape[1], b["frame_mask"].shape[1]
    for i in range(batch_size):
        case = i % 6
        if case == 1:
            b["mel_mask"][i] = False
            b["modality_mask"][i, 0] = False
        elif case == 2:
            b["frame_mask"][i] = False
            b["modality_mask"][i, 2] = False
            b["text_mask"][i, text_len // 2:] = False
            b["text_tokens"][i, text_len // 2:] = m.text_pad_id
        elif case == 3:
            b["mel_mask"][i, rng.integers(1, mel_frames):] = False
            b["frame_mask"][i, rng.integers(1, frames + 1):] = False
        elif case == 4:
            b["text_mask"][i] = False
            b["text_tokens"][i] = m.text_pad_id
            b["modality_mask"][i, 1] = False
        elif case == 5:
            b["modality_mask"][i, 3] = False
    _random_history(b, rng, m.action_len, m.dnfm.vocab_size)
    return b


def _random_history(b: dict, rng: np.random.Generator, action_len: int, vocab: int) -> None:
    """Fill `history_actions` / `history_before` in place, in the layout of `spec.batch_spec`."""
    from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID

    b["history_actions"][:] = PAD_ID
    b["history_before"][:] = PAD_ID
    for i in range(len(b["history_actions"])):
        kind = i % 3
        if kind == 0 and action_len > 1:  # executed: 1 .. action_len - 1 device tokens, then <eos>
            n = int(rng.integers(1, action_len))
            b["history_actions"][i, :n] = rng.integers(NOOP_ID + 1, vocab, size=n)
            b["history_actions"][i, n] = EOS_ID
            b["history_before"][i, :n] = rng.integers(NOOP_ID + 1, vocab, size=n)
        elif kind == 1 and action_len > 1:  # the earlier turn did nothing
            b["history_actions"][i, :2] = (NOOP_ID, EOS_ID)
            b["history_before"][i, 0] = NOOP_ID


# What the VLA rows of `world_batch` hold in turn: a follow-up whose earlier turn executed device
# actions (a non-empty action log), the plain next sample, a follow-up to a turn that did nothing.
_WORLD_VLA_LOGS = ("executed", "any", "noop")
_WORLD_SEARCH = 100  # VLA row i searches indices [i * _WORLD_SEARCH, ...) for its kind of log


def _log_kind(log: list) -> str:
    return "none" if not log else ("noop" if log[0][0] == "<noop>" else "executed")


def world_batch(cfg: Any, count: int, seed: int = 20250101) -> dict[str, np.ndarray]:
    """`count` real samples of the synthetic cabin world (all four kinds, VLA first), featurized.

    The VLA rows cycle over `_WORLD_VLA_LOGS`, so the batch always holds follow-up turns with a
    non-empty action log (`history_actions`), the input the bridge's action-log tokens read."""
    from vlacabin_jax.data import features, world
    from vlacabin_jax.data.actions import ActionVocabulary
    from vlacabin_jax.data.spec import KINDS

    tokenizer = features.load_tokenizer(cfg.data.get("tokenizer") or None)
    vocab = ActionVocabulary()
    kinds = ("vla",) * 2 + KINDS  # VLA turns are what the car sees most
    shape = (cfg.model.vit.image_size, cfg.data.num_frames, cfg.model.speech.n_mels, cfg.data.mel_frames)
    rows, vla_rows = [], 0
    for i in range(count):
        kind = kinds[i % len(kinds)]
        sample = world.generate(seed, i, kind, *shape)
        if kind == "vla":
            want = _WORLD_VLA_LOGS[vla_rows % len(_WORLD_VLA_LOGS)]
            vla_rows += 1
            index = i * _WORLD_SEARCH
            while want != "any" and _log_kind(sample["history_actions"]) != want:
                sample = world.generate(seed, index, kind, *shape)
                index += 1
        rows.append(features.featurize(sample, cfg, tokenizer, vocab))
    return {k: np.stack([r[k] for r in rows]) for k in INPUT_NAMES}


def verification_inputs(cfg: Any, random_samples: int = 8, world_samples: int = 8,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Random then world samples in one batch (the "largest batch" of the checks)."""
    parts = []
    if random_samples:
        parts.append(random_batch(cfg, random_samples, seed))
    if world_samples:
        parts.append(world_batch(cfg, world_samples))
    return {k: np.concatenate([p[k] for p in parts]) for k in INPUT_NAMES}


def take(batch: Mapping[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}


# --------------------------------------------------------------------------------------- compare


def compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], tol: Tolerance) -> dict[str, Any]:
    """Per-output figures and pass/fail against `tol` (ref and got over the same rows)."""
    outputs, ok = {}, True
    for name in FLOAT_OUTPUTS:
        r, g = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
        if r.shape != g.shape:
            outputs[name] = {"pass": False, "error": f"shape {list(g.shape)} vs reference {list(r.shape)}"}
            ok = False
            continue
        # Forbidden logits (per-setting layout) must match exactly and stay out of the figures.
        forbidden = r == FORBIDDEN_LOGIT
        forbidden_exact = bool(np.all(g[forbidden] == FORBIDDEN_LOGIT))
        r, g = r[~forbidden], g[~forbidden]
        max_abs = float(np.max(np.abs(r - g))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        limit = tol.atol * (max(1.0, scale) if tol.atol_scaled else 1.0)
        entry = {"max_abs": max_abs, "max_ref": scale, "atol": limit, "finite": bool(np.isfinite(g).all())}
        if forbidden.any():
            entry["forbidden"], entry["forbidden_exact"] = int(forbidden.sum()), forbidden_exact
        passed = entry["finite"] and forbidden_exact and max_abs <= limit
        if tol.rtol is not None and name in RELATIVE_OUTPUTS:
            entry["rel"] = max_abs / max(scale, 1e-30)
            entry["rtol"] = tol.rtol
            # Near-zero outputs (velocities of a barely trained sampler) are judged by atol alone.
            passed = passed and (scale < RELATIVE_FLOOR or entry["rel"] <= tol.rtol)
        entry["pass"] = bool(passed)
        outputs[name] = entry
        ok = ok and passed
    for name in TOKEN_OUTPUTS:
        r, g = np.asarray(ref[name]), np.asarray(got[name])
        if r.shape != g.shape:
            outputs[name] = {"pass": False, "error": f"shape {list(g.shape)} vs reference {list(r.shape)}"}
            ok = False
            continue
        agreement = float(np.mean(r == g)) if r.size else 1.0
        entry = {"agreement": agreement, "sequences_identical": float(np.mean(np.all(r == g, axis=-1))),
                 "required": tol.token_agreement, "pass": agreement >= tol.token_agreement}
        outputs[name] = entry
        ok = ok and entry["pass"]
    return {"tolerance": tol.describe(), "outputs": outputs, "pass": bool(ok)}


# --------------------------------------------------------------------------------------- runners


def run_torch(mirror, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = mirror(**{k: torch.from_numpy(np.asarray(batch[k])) for k in INPUT_NAMES})
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in out.items()}


def run_ort(session, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: np.asarray(batch[k]) for k in INPUT_NAMES})
    return dict(zip(names, values))


def ort_latency(session, batch1: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5,
                max_seconds: float = 30.0) -> dict[str, Any]:
    """Wall-clock latency of `session.run` at batch 1 (P50/P95 over up to `runs` runs)."""
    import onnxruntime as ort

    feeds = {k: np.asarray(batch1[k]) for k in INPUT_NAMES}
    for _ in range(warmup):
        session.run(None, feeds)
    times, start = [], time.perf_counter()
    while len(times) < runs and (time.perf_counter() - start < max_seconds or len(times) < 5):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"batch": 1, "runs": len(times), "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)), "mean_ms": float(np.mean(times)),
            "provider": "CPUExecutionProvider", "onnxruntime": ort.__version__, "cpu_count": os.cpu_count()}


def verify(reference: JaxReference, mirror, onnx_files: Mapping[str, str], batch: Mapping[str, np.ndarray],
           batch1_samples: int = 2, latency_runs: int = 50,
           reference_outputs: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Run every check and return the report (does not raise; see `passed` and `failures`).

    Args:
      reference: the JAX model. mirror: the float32 PyTorch mirror.
      onnx_files: {"fp32": path, "fp16": path} (either may be absent).
      batch: the inputs (`verification_inputs`); the whole batch is the "largest batch".
      batch1_samples: how many of the first samples also run alone through ONNX Runtime.
      latency_runs: runs of the batch-1 latency measurement (0: skip).
      reference_outputs: `reference(batch)` when already computed.
    """
    from vlacabin_jax.export.onnx_export import ort_session

    size = len(batch["text_tokens"])
    ref = reference(batch) if reference_outputs is None else reference_outputs
    checks: dict[str, Any] = {}
    # JAX against itself: the intermediates path must give infer's tokens (guards the reference).
    self_tokens = ref["decoded_actions"] if "decoded_actions" in ref else np.argmax(ref["action_logits"], axis=-1)
    checks["jax_self_consistency"] = {"pass": bool(np.array_equal(self_tokens, ref["action_tokens"])),
                                      "note": "dnfm.decode_actions of the recorded x1 logits equals "
                                              "functional.infer's actions"}
    checks[f"torch_fp32_batch{size}"] = compare(ref, run_torch(mirror, batch), FP32)
    latency = {}
    for precision, path in onnx_files.items():
        tol = FP32 if precision == "fp32" else FP16
        session = ort_session(path)
        checks[f"onnx_{precision}_batch{size}"] = compare(ref, run_ort(session, batch), tol)
        for i in range(min(batch1_samples, size)):
            rows = slice(i, i + 1)
            got = run_ort(session, take(batch, rows))
            checks[f"onnx_{precision}_batch1_sample{i}"] = compare(take(ref, rows), got, tol)
        if latency_runs:
            latency[precision] = ort_latency(session, take(batch, slice(0, 1)), runs=latency_runs)
    failures = [f"{name}: {out}" for name, check in checks.items()
                for out, entry in check.get("outputs", {}).items() if not entry["pass"]]
    if not checks["jax_self_consistency"]["pass"]:
        failures.append("jax_self_consistency: the JAX reference paths disagree")
    return {"tolerances": {"fp32": FP32.describe(), "fp16": FP16.describe()},
            "samples": {"batch": size}, "checks": checks, "latency": latency,
            "passed": not failures, "failures": failures}


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A short human-readable table of a `verify` report."""
    lines = [f"tolerances: fp32: {report['tolerances']['fp32']}", f"            fp16: {report['tolerances']['fp16']}"]
    for name, check in report["checks"].items():
        outs = check.get("outputs")
        if not outs:
            lines.append(f"{name:34s} {'ok' if check['pass'] else 'FAIL'}")
            continue
        floats = " ".join(f"{k}={v.get('max_abs', float('nan')):.2e}" for k, v in outs.items() if k in FLOAT_OUTPUTS)
        tokens = " ".join(f"{k.split('_')[0]}={v.get('agreement', 0):.4f}"
                          for k, v in outs.items() if k in TOKEN_OUTPUTS)
        lines.append(f"{name:34s} {'ok  ' if check['pass'] else 'FAIL'} max|diff| {floats} | tokens {tokens}")
    for precision, lat in report.get("latency", {}).items():
        lines.append(f"ORT CPU latency {precision} batch 1: P50 {lat['p50_ms']:.2f} ms, P95 {lat['p95_ms']:.2f} ms "
                     f"({lat['runs']} runs)")
    lines.append("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"][:5]))
    return lines
