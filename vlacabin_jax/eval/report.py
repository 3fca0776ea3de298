"""Reporting of evaluation results: console tables, JSON, and PNG charts (matplotlib, Agg backend).

    format_results(results)                  -> str   overall, per group, per scene, retrieval, latency
    format_comparison(results, names)        -> str   overall metrics side by side with deltas
    scalars(results, prefix)                 -> {name: float}  for JSONL / TensorBoard beside the losses
    write_json(obj, path)
    plot_per_scene(results, names, path)     per-scene success rate (one bar per result per scene)
    plot_confusion(confusion, path, title)   action-family confusion (row-normalised heatmap)

`results` is what `evaluate.evaluate_policy` / `evaluate_model` return, optionally with
"latency" (from `evaluate.latency`) and "meta" (anything JSON) added by the caller.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

# (key, short column name, format) of the overall metrics, in table order.
OVERALL = (
    ("n", "n", "d"), ("success_rate", "success", "%"), ("clean_success_rate", "clean success", "%"),
    ("single_turn_success_rate", "single-turn success", "%"),
    ("multi_turn_success_rate", "multi-turn success", "%"),
    ("avg_steps", "avg steps", ".2f"), ("avg_target_steps", "avg target steps", ".2f"),
    ("over_trigger_rate", "over-trigger", "%"), ("under_trigger_rate", "under-trigger", "%"),
    ("scene_hit_rate", "scene-mode hit", "%"), ("step_completeness", "step completeness", "%"),
    ("inversion_rate", "inversion", "%"), ("conflict_rate", "conflict", "%"),
    ("violation_rate", "guardrail violation", "%"), ("invalid_rate", "invalid sequence", "%"),
    ("explanation_token_accuracy", "explanation token acc", "%"), ("explanation_bleu", "explanation BLEU", ".3f"),
)
# Columns of the per-scene / per-group table.
SCENE_COLUMNS = (("n", "n", "d"), ("success_rate", "succ", "%"), ("over_trigger_rate", "over", "%"),
                 ("scene_hit_rate", "hit", "%"), ("step_completeness", "compl", "%"),
                 ("inversion_rate", "inv", "%"), ("conflict_rate", "conf", "%"),
                 ("violation_rate", "viol", "%"), ("invalid_rate", "invalid", "%"),
                 ("explanation_bleu", "bleu", ".2f"))


def fmt(value, spec: str) -> str:
    """One cell: "-" for None, percentages with one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "%":
        return f"{100 * value:.1f}%"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _breakdown(blocks: dict, title: str) -> str:
    rows = [[name] + [fmt(m.get(k), f) for k, _, f in SCENE_COLUMNS] for name, m in blocks.items()]
    return _table([title] + [c for _, c, _ in SCENE_COLUMNS], rows)


def format_latency(lat: dict) -> str:
    cols = (("p50_ms", ".2f"), ("p95_ms", ".2f"), ("mean_ms", ".2f"), ("samples_per_s", ".1f"),
            ("first_call_s", ".2f"), ("iters", "d"))
    rows = [[k] + [fmt(v.get(c), f) for c, f in cols] for k, v in lat.items() if isinstance(v, dict)]
    head = f"infer latency on {lat.get('device', '?')}"
    return head + "\n" + _table(["batch", "P50 ms", "P95 ms", "mean ms", "samples/s", "1st call s", "iters"], rows)


def format_retrieval(ret: dict) -> str:
    """R@1/R@5 of both directions of every pair ("a-b/n" entries give the pool size)."""
    rows = []
    for key in (k for k in ret if k.endswith("/n")):
        a, b = key[:-2].split("-")
        for p in (f"{a}->{b}", f"{b}->{a}"):
            rows.append([p, fmt(ret.get(f"{p}/R@1"), "%"), fmt(ret.get(f"{p}/R@5"), "%"), str(ret[key])])
    return _table(["retrieval", "R@1", "R@5", "pool"], rows)


def format_results(results: dict, title: str = "") -> str:
    """The console report of one evaluation."""
    parts = [title] if title else []
    ov = results["overall"]
    parts.append(_table(["metric", "value"], [[c, fmt(ov.get(k), f)] for k, c, f in OVERALL]))
    if results.get("per_group"):
        parts.append(_breakdown(results["per_group"], "group"))
    if results.get("per_scene"):
        parts.append(_breakdown(results["per_scene"], "request"))
    if results.get("retrieval"):
        parts.append(format_retrieval(results["retrieval"]))
    if results.get("latency"):
        parts.append(format_latency(results["latency"]))
    return "\n\n".join(parts)


def format_comparison(results: Sequence[dict], names: Sequence[str]) -> str:
    """Overall metrics (and retrieval / latency P50-P95 where present) side by side; with two
    results a last column holds the difference (second minus first)."""
    rows = []
    two = len(results) == 2

    def row(label, values, spec):
        cells = [fmt(v, spec) for v in values]
        if two:
            a, b = values
            d = None if a is None or b is None else b - a
            cells.append("-" if d is None else (f"{100 * d:+.1f}pt" if spec == "%" else f"{d:+.3g}"))
        rows.append([label] + cells)

    for k, c, f in OVERALL:
        row(c, [r["overall"].get(k) for r in results], f)
    keys = sorted({k for r in results for k in (r.get("retrieval") or {}) if "/R@" in k})
    for k in keys:
        row(k, [(r.get("retrieval") or {}).get(k) for r in results], "%")
    sizes = sorted({k for r in results for k, v in (r.get("latency") or {}).items() if isinstance(v, dict)})
    for s in sizes:
        for q in ("p50_ms", "p95_ms"):
            row(f"latency {s} {q}", [((r.get("latency") or {}).get(s) or {}).get(q) for r in results], ".2f")
    return _table(["metric", *names] + (["delta"] if two else []), rows)


def scalars(results: dict, prefix: str = "eval/") -> dict[str, float]:
    """The headline numbers as flat scalars (None left out): every overall metric, success per
    request group, retrieval R@k, latency P50/P95, e.g. "eval/success_rate",
    "eval/group/scene_mode/success_rate", "eval/retrieval/text->video/R@1", "eval/latency/b1/p95_ms"."""
    out = {f"{prefix}{k}": float(v) for k, v in results["overall"].items() if v is not None}
    for group, m in (results.get("per_group") or {}).items():
        if m.get("success_rate") is not None:
            out[f"{prefix}group/{group}/success_rate"] = float(m["success_rate"])
    for k, v in (results.get("retrieval") or {}).items():
        if "/R@" in k and v is not None:
            out[f"{prefix}retrieval/{k}"] = float(v)
    for size, v in (results.get("latency") or {}).items():
        if isinstance(v, dict):
            out.update({f"{prefix}latency/{size}/{q}": float(v[q]) for q in ("p50_ms", "p95_ms")})
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj, path: str) -> None:
    """Write results as indented UTF-8 JSON (numpy scalars and arrays converted, NaN → null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, ensure_ascii=False, indent=1)
        f.write("\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_per_scene(results: Sequence[dict], names: Sequence[str], path: str, key: str = "success_rate") -> None:
    """Horizontal bars of `key` per request type (scene modes first), one bar per result."""
    plt = _pyplot()
    from vlacabin_jax.eval.metrics import request_group

    scenes = sorted({s for r in results for s in r["per_scene"]},
                    key=lambda s: (("scene_mode", "single", "follow_up").index(request_group(s)), s))
    h = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(scenes) * max(1, len(results) * 0.7) + 1.5))
    y = np.arange(len(scenes))
    for i, (r, name) in enumerate(zip(results, names)):
        vals = [(r["per_scene"].get(s) or {}).get(key) for s in scenes]
        ax.barh(y + i * h, [0 if v is None else 100 * v for v in vals], height=h, label=name)
    ax.set_yticks(y + h * (len(results) - 1) / 2)
    ax.set_yticklabels([f"{s} (n={max((r['per_scene'].get(s) or {}).get('n', 0) for r in results)})"
                        for s in scenes], fontsize=7)
    ax.set_ylim(len(scenes) - 0.5 + h * (len(results) - 1), -0.5)  # first scene on top, no margins
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title(f"{key.replace('_', ' ')} per request type")
    ax.grid(axis="x", alpha=0.3)
    if len(results) > 1:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: dict, path: str, title: str = "action-family confusion") -> None:
    """Heatmap of `metrics.confusion`: rows (target families) normalised to 1, counts in the cells;
    all-zero rows and columns are left out."""
    plt = _pyplot()
    labels, m = confusion["labels"], np.asarray(confusion["matrix"], float)
    keep_r = [i for i in range(len(labels)) if m[i].sum() > 0]
    keep_c = [j for j in range(len(labels)) if m[:, j].sum() > 0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * max(1, len(keep_c)), 1.0 + 0.55 * max(1, len(keep_r))))
    if keep_r and keep_c:
        sub = m[np.ix_(keep_r, keep_c)]
        norm = sub / np.maximum(sub.sum(1, keepdims=True), 1e-9)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(sub.shape[0]):
            for j in range(sub.shape[1]):
                v = sub[i, j]
                if v:
                    text = f"{v:.0f}" if abs(v - round(v)) < 1e-6 else f"{v:.1f}"  # spread counts are fractional
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(keep_c)))
        ax.set_xticklabels([labels[j] for j in keep_c], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(keep_r)))
        ax.set_yticklabels([labels[i] for i in keep_r], fontsize=8)
    ax.set_xlabel("predicted family")
    ax.set_ylabel("target family")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
