"""The projection of the benchmark: 16 nodes x 8 A100 at 200 and 400 Gb/s InfiniBand.

    project(config, configs, out, sweeps=..., aot_dirs=...)  -> exit code; prints a table, writes
                                                                  projection.json, .png

Per config variant and cluster layout, the projected step time and scaling efficiency, from the HLO
collectives a sweep measured on the matching 8-device mesh (`sweeps`, XLA:CPU) where there is one,
else from the analytic minimum (the model itself is `vlacabin_jax/perf/projection.py`). With
`aot_dirs` (`--aot` output directories), a layout that an `aot.json` row compiled for 128 devices
(same variant, same mesh) gets a second row beside that one: the same projection with the
collectives of the GPU (or TPU) compiler's own HLO of the train step.
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


def aot_traffic(row: dict) -> dict[tuple[str, tuple[str, ...]], dict] | None:
    """{(kind, axes): {"bytes", "ops"}} of an aot.json row's compiled train step (bytes per device
    per step, loop trip counts applied; ops = executions per step), or None when it has none.

    Each kind's `by_axes` split ({"data,fsdp": counts}) places every set of groups on its own links;
    an aot.json without it (written before it existed) has one axis set per kind, the union over
    that kind's collectives, so all its bytes are placed over that union: an upper bound where a
    kind mixes narrower groups."""
    step = (row.get("programs") or {}).get("train_step") or {}
    colls = step.get("collectives")
    if not colls:
        return None
    traffic: dict = {}
    for kind, c in colls.items():
        parts = ({tuple(a for a in k.split(",") if a): v for k, v in c["by_axes"].items()} if "by_axes" in c
                 else {tuple(c.get("axes") or ()): c})
        for axes, v in parts.items():
            if v.get("bytes"):
                traffic[(kind, axes)] = {"bytes": float(v["bytes"]),
                                         "ops": int(v.get("executions") or v.get("ops") or 1)}
    return traffic


def aot_label(row: dict) -> str:
    """The source column of an aot.json row: 'GPU a100:16x1x8', 'XLA:CPU cpu:128', 'TPU tpu:v5p-128'."""
    platform = row.get("platform") or ("cpu" if str(row.get("target", "")).startswith("cpu:") else "cuda")
    return {"cuda": "GPU", "cpu": "XLA:CPU", "tpu": "TPU"}.get(platform, platform) + " " + row["target"]


def _compute_batch(row: dict, default: int) -> int:
    """Samples of compute per device of an aot.json row: global batch / devices (a tensor-parallel
    device holds global / (data x fsdp) rows but does 1/tensor of their work); older rows without
    the global batch: their per-device batch."""
    if row.get("global_batch") and row.get("num_devices"):
        return max(int(row["global_batch"]) // int(row["num_devices"]), 1)
    return max(int(row.get("per_device_batch") or default), 1)


def _aot_rows(paths: str | None, devices: int) -> dict[tuple[str, str], dict]:
    """{(variant, mesh, target): aot.json row} of the `--aot-dir` directories, rows compiled for
    `devices` devices whose train step compiled (a later directory's row replaces an earlier one's
    of the same target)."""
    found: dict = {}
    for d in filter(None, (paths or "").split(",")):
        f = Path(d) / "aot.json" if not d.endswith(".json") else Path(d)
        if not f.is_file():
            raise BenchError(f"--aot-dir {d}: no aot.json there; run python -m tools.mesh_bench --aot "
                             f"a100:16x1x8 --config ... --out {d} first")
        try:
            payload = json.loads(f.read_text())
            rows = payload["rows"]
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"--aot-dir {d}: {f} is not an aot.json ({e})") from None
        for r in rows:
            variant = r.get("variant") or str(payload.get("config", "")).rsplit(":", 1)[-1]
            if r.get("num_devices") == devices and aot_traffic(r) is not None:
                found[(variant, r["mesh"], r.get("target", ""))] = r
    if paths and not found:
        raise BenchError(f"--aot-dir {paths}: no row with a compiled train step for {devices} devices")
    return found


def project(config: str, configs: str, out: str | Path, overrides: Sequence[str] = (), sweeps: str | None = None,
            mfu_assumed: float = 0.4, aot_dirs: str | None = None) -> int:
    """16 nodes x 8 A100 at 200 and 400 Gb/s: projected step time and scaling efficiency per layout,
    from measured HLO collectives (`sweeps`: comma-separated sweep --out directories) where there
    are some, else the analytic minimum. `config`'s file supplies the variants `configs` ("tiny,small").
    `aot_dirs` (comma-separated `--aot` --out directories or aot.json files): a layout compiled there
    gets a second row from that compiled train step's collectives, labelled with its target."""
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.perf import analytic, projection

    found = _sweeps(sweeps)
    compiled = _aot_rows(aot_dirs, projection.Cluster().size)
    width = max([9] + [len(aot_label(r)) for r in compiled.values()])
    config_file = config.partition(":")[0]
    rows, lines = [], []
    head = (f"{'config':9} {'layout':8} {'source':{width}} {'IB Gb/s':>7} {'B/dev':>5} {'compute ms':>10} "
            f"{'NVLink ms':>9} {'IB ms':>8} {'lat ms':>6} {'step ms none/full':>19} {'eff none/full':>13}")
    lines.append(head)
    pairs = []
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
                traffic, source, kind = _measured_traffic(measured), "HLO " + source_mesh, "xla:cpu sweep"
            else:
                params = analytic.param_table(cfg) if params is None else params
                cfg.train.global_batch_size = per_device * math.prod(layout.values())
                traffic, source, kind = analytic.minimum_bytes(cfg, layout, params), "analytic", "analytic"
            sources = [(traffic, source, kind, per_device)]
            for (v, mesh, _), aot_row in compiled.items():
                if (v, mesh) == (variant, layout_name):
                    sources.append((aot_traffic(aot_row), aot_label(aot_row), "aot " + aot_row["target"],
                                    _compute_batch(aot_row, per_device)))
            effs = {}
            for ib in (200.0, 400.0):
                cluster = projection.Cluster(ib_Gbps=ib)
                for traffic_i, source_i, kind_i, batch_i in sources:
                    compute = projection.compute_seconds(model_flops_per_sample(cfg) * batch_i, cluster,
                                                         mfu_assumed)
                    p = projection.project(compute, traffic_i, layout, cluster)
                    row = {"config": variant, "layout": layout_name, "source": source_i, "ib_Gbps": ib,
                           "per_device_batch": batch_i, "compute_s": p.compute_s, "nvlink_s": p.nvlink_s,
                           "ib_s": p.ib_s, "latency_s": p.latency_s, "step_no_overlap_s": p.step_no_overlap_s,
                           "step_full_overlap_s": p.step_full_overlap_s,
                           "efficiency_no_overlap": p.efficiency_no_overlap,
                           "efficiency_full_overlap": p.efficiency_full_overlap}
                    if compiled:
                        row["collectives_from"] = kind_i
                    rows.append(row)
                    effs.setdefault(source_i, []).append(p)
                    lines.append(f"{variant:9} {layout_name:8} {source_i[:width]:{width}} {ib:7.0f} {batch_i:5d} "
                                 f"{p.compute_s * 1e3:10.3f} {p.nvlink_s * 1e3:9.3f} {p.ib_s * 1e3:8.3f} "
                                 f"{p.latency_s * 1e3:6.2f} {p.step_no_overlap_s * 1e3:9.3f}/"
                                 f"{p.step_full_overlap_s * 1e3:<9.3f}"
                                 f"{p.efficiency_no_overlap:6.3f}/{p.efficiency_full_overlap:<6.3f}")
            if len(sources) > 1:
                pairs.append((variant, layout_name, effs))
    if pairs:
        lines.append("XLA:CPU sweep / analytic vs GPU-compiled collectives, step ms (no overlap) and "
                     "efficiency none/full at 200 | 400 Gb/s:")
        for variant, layout_name, effs in pairs:
            for source, ps in effs.items():
                lines.append(f"  {variant:9} {layout_name:8} {source:{width}}  " + " | ".join(
                    f"{p.step_no_overlap_s * 1e3:9.1f} ms {p.efficiency_no_overlap:.3f}/"
                    f"{p.efficiency_full_overlap:.3f}" for p in ps))
    lines.append(f"16 nodes x 8 A100; compute = analytic model FLOPs per device-step at an assumed "
                 f"{mfu_assumed:.0%} MFU; layouts DATAxFSDPxTENSOR; 'HLO m' = collectives measured on the "
                 f"8-device mesh m (same sharded axes, same per-device batch), 'analytic' = the minimum of "
                 f"vlacabin_jax/perf/analytic.py. Model assumptions:")
    if compiled:
        lines.append("'GPU t' ('XLA:CPU cpu:N', 'TPU t') = the train step's collectives as compiled for target t "
                     "on the same mesh (--aot-dir aot.json: unique channel ids, loop trip counts applied, each "
                     "group set on its own axes); its compute is the same analytic figure at the compiled "
                     "per-device batch (global batch / devices)")
    lines += [f"  - {a}" for a in projection.ASSUMPTIONS]
    text = "\n".join(lines)
    print(text)
    out = Path(out)
    payload = {"rows": rows, "assumptions": list(projection.ASSUMPTIONS), "mfu_assumed": mfu_assumed, "table": text}
    if compiled:
        payload["aot_dirs"] = aot_dirs
    path = write(out, "projection.json", payload)
    plot_projection(rows, out / "projection.png")
    print(f"wrote {path} and {out / 'projection.png'}")
    return 0


def plot_projection(rows: list[dict], path: Path) -> None:
    """Scaling efficiency (no overlap) per config and layout, 200 vs 400 Gb/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key(r: dict) -> tuple:
        gpu = str(r.get("collectives_from", "")).startswith("aot")
        return (r["config"], r["layout"], r["source"] if gpu else "")

    labels = list(dict.fromkeys(key(r) for r in rows))  # table order: a GPU-compiled row beside its layout's
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.7), 4.5))
    for j, ib in enumerate((200.0, 400.0)):
        eff = {key(r): r["efficiency_no_overlap"] for r in rows if r["ib_Gbps"] == ib}
        ax.bar([i + 0.4 * j for i in range(len(labels))], [eff.get(k, 0) for k in labels], 0.4, label=f"{ib:.0f} Gb/s")
    ax.set_xticks([i + 0.2 for i in range(len(labels))],
                  [f"{c}\n{lay}" + (f"\n{src}" if src else "") for c, lay, src in labels], fontsize=7)
    ax.set_ylabel("projected scaling efficiency (no overlap)")
    ax.set_title("16 nodes x 8 A100")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
