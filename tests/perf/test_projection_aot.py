"""`--project --aot-dir`: the projection takes a GPU AOT compile's collectives (aot.json) for the
layouts compiled there and prints them beside the XLA:CPU / analytic rows (no compile: a
hand-made aot.json)."""
from __future__ import annotations

import json

import pytest

from tools import mesh_bench
from vlacabin_jax.perf import projection
from vlacabin_jax.perf.bench import cluster

COLLECTIVES = {
    "all-gather": {"axes": ["data"], "bytes": 1e6, "executions": 2, "ops": 2},
    "all-reduce": {"axes": ["data"], "bytes": 4e8, "executions": 30, "ops": 10},
    "reduce-scatter": {"axes": [], "bytes": 0.0, "executions": 0, "ops": 0},
}


def _aot_json(directory, rows) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "aot.json").write_text(json.dumps({"config": "configs/vla_cabin.py:tiny", "limits": [],
                                                    "rows": rows}))


def _row(mesh="128x1x1", num_devices=128, collectives=COLLECTIVES) -> dict:
    return {"target": "a100:16x1x8", "variant": "tiny", "mesh": mesh, "num_devices": num_devices,
            "per_device_batch": 2.0, "programs": {"train_step": {"collectives": collectives}}}


def test_aot_traffic_reads_the_train_steps_collectives():
    traffic = cluster.aot_traffic(_row())
    assert traffic == {("all-gather", ("data",)): {"bytes": 1e6, "ops": 2},
                       ("all-reduce", ("data",)): {"bytes": 4e8, "ops": 30}}
    assert cluster.aot_traffic({"programs": {"train_step": {"error": "boom"}}}) is None


def test_project_prints_the_gpu_row_beside_the_cpu_based_one(tmp_path, capsys):
    aot_dir = tmp_path / "aot"
    # 8-device and 16x8x1-without-collectives rows are not used.
    _aot_json(aot_dir, [_row(), _row(mesh="8x1x1", num_devices=8), _row(mesh="16x8x1", collectives={})])
    assert mesh_bench.main(["--project", "--configs", "tiny", "--aot-dir", str(aot_dir),
                            "--out", str(tmp_path / "proj")]) == 0
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "proj" / "projection.json").read_text())
    rows = payload["rows"]
    gpu = [r for r in rows if r["source"] == "GPU a100:16x1x8"]
    assert [(r["layout"], r["ib_Gbps"]) for r in gpu] == [("128x1x1", 200.0), ("128x1x1", 400.0)]
    assert all(r["collectives_from"] == "aot a100:16x1x8" for r in gpu)
    assert {r["source"] for r in rows if r["layout"] == "128x1x1"} == {"analytic", "GPU a100:16x1x8"}
    assert {r["source"] for r in rows if r["layout"] == "16x8x1"} == {"analytic"}
    assert payload["aot_dirs"] == str(aot_dir)
    # The GPU row is the projection model applied to the aot.json bytes; its compute is the same
    # analytic figure at the compiled per-device batch (2 here; tiny's 16 over 128 GPUs gives 1).
    for r in gpu:
        c = projection.Cluster(ib_Gbps=r["ib_Gbps"])
        p = projection.project(r["compute_s"], cluster.aot_traffic(_row()),
                               {"data": 128, "fsdp": 1, "tensor": 1}, c)
        assert r["ib_s"] == pytest.approx(p.ib_s) and r["latency_s"] == pytest.approx(32 * c.ib_latency_s)
        assert r["efficiency_no_overlap"] == pytest.approx(p.efficiency_no_overlap)
        base = next(b for b in rows if b["source"] == "analytic" and b["layout"] == "128x1x1"
                    and b["ib_Gbps"] == r["ib_Gbps"])
        assert r["per_device_batch"] == 2 and base["per_device_batch"] == 1
        assert r["compute_s"] == pytest.approx(2 * base["compute_s"])
    # Both rows in the table, and in the side-by-side summary.
    assert sum("128x1x1" in ln and "GPU a100:16x1x8" in ln for ln in out.splitlines()) == 3
    assert "vs GPU-compiled collectives" in out


def test_without_the_flag_the_projection_is_unchanged(tmp_path):
    assert mesh_bench.main(["--project", "--configs", "tiny", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "projection.json").read_text())
    assert {r["source"] for r in payload["rows"]} == {"analytic"} and "aot_dirs" not in payload
    assert all("collectives_from" not in r for r in payload["rows"])
    assert payload["table"].splitlines()[0].split()[2] == "source"


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no aot.json there"),
    (lambda d: _aot_json(d, [_row(num_devices=8)]), "no row with a compiled train step for 128 devices"),
    (lambda d: (d.mkdir(), (d / "aot.json").write_text("[]")), "is not an aot.json"),
])
def test_bad_aot_dir_is_one_error_line(make, message, tmp_path, capsys):
    d = tmp_path / "aot"
    make(d)
    assert mesh_bench.main(["--project", "--configs", "tiny", "--aot-dir", str(d), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_by_axes_places_each_group_set_on_its_own_links():
    """A kind whose collectives span different axes (FSDP gathers inside a node, gradient
    reductions across nodes) is split by axes, not placed over their union."""
    colls = {"all-gather": {"axes": ["data", "fsdp"], "bytes": 3e9, "executions": 5, "ops": 3,
                            "by_axes": {"fsdp": {"bytes": 2e9, "executions": 4, "ops": 2},
                                        "data,fsdp": {"bytes": 1e9, "executions": 1, "ops": 1}}}}
    traffic = cluster.aot_traffic(_row(mesh="16x8x1", collectives=colls))
    assert traffic == {("all-gather", ("fsdp",)): {"bytes": 2e9, "ops": 4},
                       ("all-gather", ("data", "fsdp")): {"bytes": 1e9, "ops": 1}}
    layout, c = {"data": 16, "fsdp": 8, "tensor": 1}, projection.Cluster()
    split = projection.project(1.0, traffic, layout, c)
    union = projection.project(1.0, {("all-gather", ("data", "fsdp")): {"bytes": 3e9, "ops": 5}}, layout, c)
    assert split.ib_s < union.ib_s  # the in-node gathers no longer cross InfiniBand


def test_aot_analyse_splits_each_kind_by_axes():
    from vlacabin_jax.perf import aot

    text = """HloModule m, num_partitions=4

ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %a = f32[8]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %b = f32[8]{0} all-reduce(%a), channel_id=2, replica_groups={{0,2},{1,3}}, to_apply=%add
  ROOT %c = f32[8]{0} all-reduce(%b), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
}
"""

    class Compiled:
        def as_text(self):
            return text

        def memory_analysis(self):
            return None

    kinds = aot.analyse(Compiled(), aot.parse_target("a100:1x1x4"), {"data": 2, "fsdp": 2, "tensor": 1})["collectives"]
    ar = kinds["all-reduce"]
    assert ar["axes"] == ["data", "fsdp"] and ar["ops"] == 3 and ar["bytes"] == 96.0
    assert ar["by_axes"] == {"fsdp": {"ops": 1, "executions": 1, "bytes": 32.0},
                             "data": {"ops": 1, "executions": 1, "bytes": 32.0},
                             "data,fsdp": {"ops": 1, "executions": 1, "bytes": 32.0}}
    assert kinds["all-gather"]["by_axes"] == {}


def test_a_tensor_parallel_rows_compute_is_its_share_of_the_global_batch(tmp_path):
    # 16x4x2: every device holds 1024 / 64 = 16 rows but does half their work: 8 samples of compute.
    row = {**_row(mesh="16x4x2"), "global_batch": 1024, "per_device_batch": 16.0}
    _aot_json(tmp_path / "aot", [row])
    assert mesh_bench.main(["--project", "--configs", "tiny", "--aot-dir", str(tmp_path / "aot"),
                            "--out", str(tmp_path / "proj")]) == 0
    rows = json.loads((tmp_path / "proj" / "projection.json").read_text())["rows"]
    gpu = [r for r in rows if r["source"] == "GPU a100:16x1x8"]
    assert gpu and all(r["layout"] == "16x4x2" and r["per_device_batch"] == 8 for r in gpu)


def test_rows_of_several_targets_for_one_layout_each_get_a_row(tmp_path):
    gpu = _row()
    cpu = {**_row(), "target": "cpu:128", "platform": "cpu"}
    _aot_json(tmp_path / "gpu", [gpu])
    _aot_json(tmp_path / "cpu", [cpu])
    assert mesh_bench.main(["--project", "--configs", "tiny", "--aot-dir", f"{tmp_path / 'cpu'},{tmp_path / 'gpu'}",
                            "--out", str(tmp_path / "proj")]) == 0
    rows = json.loads((tmp_path / "proj" / "projection.json").read_text())["rows"]
    assert {r["source"] for r in rows if r["layout"] == "128x1x1"} == {"analytic", "GPU a100:16x1x8",
                                                                       "XLA:CPU cpu:128"}
