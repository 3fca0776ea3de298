"""The deviceless mode of the benchmark: the trainer's programs compiled for absent GPUs / TPU
slices (`vlacabin_jax.perf.aot`).

    aot("a100:16x1x8", config, out)                       -> exit code
    aot("h100:1x1x8,tpu:v4-8", config, out, meshes="8x1x1,4x2x1", programs="train_step")

Prints per target x mesh the train step's bytes per device against the target's memory (fits or
not), its FLOPs against `model_flops_per_sample`, its collectives by kind (unique channel ids, bytes)
against the analytic minimum, and each program's compile time; writes `aot.json` and `aot.png`.
Needs the extras `aot-gpu` / `aot-tpu` (docs/performance.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from vlacabin_jax.perf.bench.common import BenchError, load_config, parse_meshes

GIB = 2**30


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def row_lines(row: dict) -> list[str]:
    """The console lines of one aot.json row."""
    head = f"{row['target']}  mesh {row['mesh']}  ({row['per_device_batch']:g} samples per device)"
    lines = [head]
    for name, prog in row["programs"].items():
        if "error" in prog:
            lines.append(f"  {name:<10} FAILED after {prog['compile_s']:.0f} s: {prog['error']}")
            continue
        m = prog["memory"]
        lines.append(f"  {name:<10} compile {prog['compile_s']:6.1f} s   GiB/device: args {_gib(m.get('argument_bytes'))}"
                     f"  out {_gib(m.get('output_bytes'))}  temp {_gib(m.get('temp_bytes'))}"
                     f"  alias {_gib(m.get('alias_bytes'))}  total {_gib(m.get('total_bytes'))}")
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "unknown"}[row["fits"]]
    if not row["device_memory_bytes"]:  # cpu:N
        lines.append(f"  train step {_gib(row['bytes_per_device'])} GiB per device (XLA:CPU: no device memory to fit)")
    else:
        lines.append(f"  train step {_gib(row['bytes_per_device'])} GiB of {_gib(row['usable_bytes'])} usable "
                     f"({row['mem_fraction']:.0%} of {_gib(row['device_memory_bytes'])}); largest program "
                     f"{row.get('largest_program') or '-'}, headroom {_gib(row['headroom_bytes'])} GiB: {verdict}")
    f = row["flops"]
    if f["hlo_per_device"]:
        lines.append(f"  FLOPs/device: HLO {f['hlo_per_device']:.3g} ({f.get('hlo_source', 'compiled')}), model "
                     f"{f['model_per_device']:.3g}: HLO/model {f['hlo_over_model']:.2f} (XLA counts a loop body once)")
    colls = row["programs"].get("train_step", {}).get("collectives", {})
    for kind, c in colls.items():
        if c["ops"] or row["analytic_bytes"].get(kind):
            lines.append(f"  {kind:<19} {c['ops']:4d} ops ({c['executions']} runs) {c['bytes'] / 2**20:10.1f} MiB"
                         f"  analytic min {row['analytic_bytes'].get(kind, 0.0) / 2**20:10.1f} MiB"
                         f"  axes {','.join(c['axes']) or '-'}")
    return lines


def aot(targets: str, config: str, out: str | Path, overrides: Sequence[str] = (), meshes: str | None = None,
        programs: str = "init,train_step,infer", save_hlo: bool = False) -> int:
    """Compiles `programs` for each of `targets` ("a100:16x1x8,tpu:v5p-128") and mesh of `meshes`
    (default: the config's mesh, filled to the target): validates everything first (one error
    line, BenchError), then compiles row by row, writing `aot.json` after each."""
    from vlacabin_jax.perf import aot as deviceless

    out = Path(out)
    try:
        target_list = [deviceless.parse_target(t) for t in targets.split(",") if t.strip()]
        for target in target_list:
            deviceless.check_plugin(target)
        deviceless.prepare_host(max([t.num_devices for t in target_list if t.platform == "cpu"], default=0))
        cfg = load_config(config, overrides)
        mesh_list = parse_meshes(meshes) if meshes else [None]
        program_list = [p.strip() for p in programs.split(",") if p.strip()]
        jobs = [(t, deviceless.resolve_mesh(cfg, t, m)) for t in target_list for m in mesh_list]
        rows = []
        for target in target_list:
            devices = deviceless.target_devices(target)
            for t, mesh in jobs:
                if t is not target:
                    continue
                row = deviceless.compile_row(cfg, target, mesh, program_list, devices, keep_hlo=save_hlo,
                                            log=lambda s: print(s, file=sys.stderr, flush=True))
                if save_hlo:
                    for name, prog in row["programs"].items():
                        if "hlo" in prog:
                            path = out / "hlo" / f"{target.name.replace(':', '_')}_{row['mesh']}_{name}.txt"
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_text(prog.pop("hlo"))
                rows.append(row)
                print("\n".join(row_lines(row)), flush=True)
                deviceless.write_results(out, rows, config)  # after every row: a later crash keeps the earlier
    except deviceless.AotError as e:
        raise BenchError(str(e)) from None
    print(f"wrote {out / 'aot.json'} and {out / 'aot.png'}")
    return 0
