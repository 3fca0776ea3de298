"""The projection of the benchmark: 16 nodes x 8 A100 at 200 and 400 Gb/s InfiniBand.

    project(config, configs, out, sweeps=...)  -> exit code; prints a table, writes projection.json, .png

Per config variant and cluster layout, the projected step time and scaling efficiency, from the HLO
collectives a sweep measured on the matching 8-device mesh (`sweeps`) where there is one, else from
the analytic minimum (the model itself is `vlacabin_jax/perf/projection.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from vlacabin_jax.perf.bench.common import AXES, BenchError, compiled_view, load_config, parse_mesh, write

# Cluster layouts of 128 GPUs and the 8-device mesh whose measured collectives stand in for them
# (the same axes are sharded, so the same collectives run over larger groups).
LAYOUTS = (("128x1x1", "8x1x1"), ("16x8x1", "4x2x1"), ("1x128x1", "1x8x1"), ("16x4x2", "2x2x2"))


def _measured_traffic(result: dict) -> dict[tuple[str, tuple[str, ...]], dict]:
    traffic: dict = {}
    for c in result.get("collectives", []):
        key = (c["kind"], tuple(c["axes"]))
        row = traffic.setdefault(key, {"bytes": 0.0, "ops": 0})
        row["bytes"] += c["bytes"] * c["count"]
        row["ops"] += c["count"]
    return traffic


def _sweeps(paths: str | None) -> dict[str, dict]:
    """{variant: sweep.json payload} of the `--sweeps` directories."""
    found: dict[str, dict] = {}
    for d in filter(None, (paths or "").split(",")):
        f = Path(d) / "sweep.json"
        if not f.is_file():
            raise BenchError(f"--sweeps {d}: no sweep.json there; run a sweep with --out {d} first")
        payload = json.loads(f.read_text())
        found[payload["config"].rsplit(":", 1)[-1]] = payload
    return found


def project(config: str, configs: str, out: str | Path, overrides: Sequence[str] = (), sweeps: str | None = None,
            mfu_assumed: float = 0.4) -> int:
    """16 nodes x 8 A100 at 200 and 400 Gb/s: projected step time and scaling efficiency per layout,
    from measured HLO collectives (`sweeps`: comma-separated sweep --out directories) where there
    are some, else the analytic minimum. `config`'s file supplies the variants `configs` ("tiny,small")."""
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.perf import analytic, projection

    found = _sweeps(sweeps)
    config_file = config.partition(":")[0]
    rows, lines = [], []
    head = (f"{'config':9} {'layout':8} {'source':9} {'IB Gb/s':>7} {'B/dev':>5} {'compute ms':>10} "
            f"{'NVLink ms':>9} {'IB ms':>8} {'lat ms':>6} {'step ms none/full':>19} {'eff none/full':>13}")
    lines.append(head)
    for variant in configs.split(","):
        cfg = load_config(f"{config_file}:{variant}", overrides)
        sweep_payload = found.get(variant)
        per_device = (sweep_payload["global_batch"] // 8 if sweep_payload
                      else int(cfg.train.global_batch_size) // projection.Cluster().size)
        per_device = max(per_device, 1)
        params = None
        for layout_name, source_mesh in LAYOUTS:
            layout = dict(zip(AXES, parse_mesh(layout_name)))
            measured = None
            if sweep_payload:
                # A mesh whose steps failed still has its compiled program's collectives.
                measured = next((compiled_view(r) for r in sweep_payload["meshes"]
                                 if r["mesh"] == source_mesh and compiled_view(r) is not None), None)
            if measured is not None:
                traffic, source = _measured_traffic(measured), "HLO " + source_mesh
            else:
                params = analytic.param_table(cfg) if params is None else params
                cfg.train.global_batch_size = per_device * math.prod(layout.values())
                traffic, source = analytic.minimum_bytes(cfg, layout, params), "analytic"
            for ib in (200.0, 400.0):
                cluster = projection.Cluster(ib_Gbps=ib)
                compute = projection.compute_seconds(model_flops_per_sample(cfg) * per_device, cluster,
                                                     mfu_assumed)
                p = projection.project(compute, traffic, layout, cluster)
                rows.append({"config": variant, "layout": layout_name, "source": source, "ib_Gbps": ib,
                             "per_device_batch": per_device, "compute_s": p.compute_s, "nvlink_s": p.nvlink_s,
                             "ib_s": p.ib_s, "latency_s": p.latency_s, "step_no_overlap_s": p.step_no_overlap_s,
                             "step_full_overlap_s": p.step_full_overlap_s,
                             "efficiency_no_overlap": p.efficiency_no_overlap,
                             "efficiency_full_overlap": p.efficiency_full_overlap})
                lines.append(f"{variant:9} {layout_name:8} {source[:9]:9} {ib:7.0f} {per_device:5d} "
                             f"{p.compute_s * 1e3:10.3f} {p.nvlink_s * 1e3:9.3f} {p.ib_s * 1e3:8.3f} "
                             f"{p.latency_s * 1e3:6.2f} {p.step_no_overlap_s * 1e3:9.3f}/"
                             f"{p.step_full_overlap_s * 1e3:<9.3f}"
                             f"{p.efficiency_no_overlap:6.3f}/{p.efficiency_full_overlap:<6.3f}")
    lines.append(f"16 nodes x 8 A100; compute = analytic model FLOPs per device-step at an assumed "
                 f"{mfu_assumed:.0%} MFU; layouts DATAxFSDPxTENSOR; 'HLO m' = collectives measured on the "
                 f"8-device mesh m (same sharded axes, same per-device batch), 'analytic' = the minimum of "
                 f"vlacabin_jax/perf/analytic.py. Model assumptions:")
    lines += [f"  - {a}" for a in projection.ASSUMPTIONS]
    text = "\n".join(lines)
    print(text)
    out = Path(out)
    path = write(out, "projection.json", {"rows": rows, "assumptions": list(projection.ASSUMPTIONS),
                                           "mfu_assumed": mfu_assumed, "table": text})
    plot_projection(rows, out / "projection.png")
    print(f"wrote {path} and {out / 'projection.png'}")
    return 0


def plot_projection(rows: list[dict], path: Path) -> None:
    """Scaling efficiency (no overlap) per config and layout, 200 vs 400 Gb/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["config"], r["layout"]) for r in rows}, key=lambda k: [r["config"] for r in rows].index(k[0]))
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.7), 4.5))
    for j, ib in enumerate((200.0, 400.0)):
        eff = {(r["config"], r["layout"]): r["efficiency_no_overlap"] for r in rows if r["ib_Gbps"] == ib}
        ax.bar([i + 0.4 * j for i in range(len(labels))], [eff.get(k, 0) for k in labels], 0.4, label=f"{ib:.0f} Gb/s")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], [f"{c}\n{lay}" for c, lay in labels], fontsize=7)
    ax.set_ylabel("projected scaling efficiency (no overlap)")
    ax.set_title("16 nodes x 8 A100")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
