"""Deviceless AOT (`vlacabin_jax.perf.aot`, `mesh_bench --aot`): target parsing, the one-line
errors, collectives by channel id and the output files. Nothing here compiles: the plugins are not
in the test extra (docs/performance.md: the check command that compiles `tiny` for real)."""
from __future__ import annotations

import json

import pytest

from tools import mesh_bench
from vlacabin_jax.perf import aot, hlo


@pytest.mark.parametrize("text, platform, devices, topology, memory", [
    ("a100:16x1x8", "cuda", 128, "16x1x8", 85100068864),
    ("h100:1x1x8", "cuda", 8, "1x1x8", 84942979072),
    ("tpu:v5p-128", "tpu", 64, "v5:4x4x4", 95 * 2**30),
    ("tpu:v5e-256", "tpu", 256, "v5e:16x16", 16 * 2**30),
    ("tpu:v4-8", "tpu", 4, "v4:2x2x1", 32 * 2**30),
    ("TPU:v4-32", "tpu", 16, "v4:2x2x4", 32 * 2**30),
])
def test_targets_parse_to_devices_topology_and_memory(text, platform, devices, topology, memory):
    t = aot.parse_target(text)
    assert (t.platform, t.num_devices, t.topology, t.device_memory_bytes) == (platform, devices, topology, memory)
    assert t.usable_bytes == int(memory * (aot.GPU_MEM_FRACTION if platform == "cuda" else 1.0))


def test_torus_dims_follow_gcp_slice_shapes():
    assert [aot.torus_dims(n, 3) for n in (4, 8, 16, 32, 64, 128)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8)]
    assert [aot.torus_dims(n, 2) for n in (4, 8, 64, 256)] == [(2, 2), (2, 4), (8, 8), (16, 16)]


def test_gpu_target_config_carries_the_device_facts():
    text = aot.gpu_target_config("a100")
    assert "core_count: 108" in text and "device_memory_size: 85100068864" in text
    assert "cuda_compute_capability { major: 8 minor: 0 }" in text and 'platform_name: "CUDA"' in text
    assert "collective_memory_granularity" not in text  # jaxlib 0.10.2 rejects it
    assert "major: 9" in aot.gpu_target_config("h100")


@pytest.fixture
def no_host_changes(monkeypatch):
    """The tool must not switch this test process's JAX to other platforms."""
    monkeypatch.setattr(aot, "prepare_host", lambda *args: None)


def _error_line(argv, capsys) -> str:
    assert mesh_bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("target, message", [
    ("b200:1x1x8", "unknown target 'b200:1x1x8'; use one of a100:SLICESxHOSTSxGPUS"),
    ("a100:16x8", "write a100:SLICESxHOSTSxGPUS with positive sizes"),
    ("tpu:v9-8", "unknown TPU target 'tpu:v9-8'"),
    ("tpu:v5p-12", "a v5p slice has 8, 16, 32, ... cores"),
    ("a100", "unknown target 'a100'"),
])
def test_an_unknown_target_is_one_error_line(target, message, capsys, tmp_path, no_host_changes):
    assert message in _error_line(["--aot", target, "--out", str(tmp_path)], capsys)


@pytest.mark.parametrize("target, module, install", [
    ("a100:1x1x8", "jax_cuda12_plugin", "pip install -e '.[aot-gpu]'"),
    ("tpu:v4-8", "libtpu", "pip install -e '.[aot-tpu]'"),
])
def test_a_missing_plugin_names_the_install_command(target, module, install, capsys, tmp_path, monkeypatch,
                                                     no_host_changes):
    real = aot.importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    line = _error_line(["--aot", target, "--out", str(tmp_path)], capsys)
    assert module in line and install in line


@pytest.mark.parametrize("meshes, message", [
    ("4x1x1", "mesh 4x1x1 has 4 devices but target a100:1x1x8 has 8"),
    ("2x2x3", "mesh 2x2x3 has 12 devices"),
    ("1x1x8", "does not divide"),  # tensor 8 does not divide tiny's 4 heads
    ("8x1", "is not DATAxFSDPxTENSOR"),
])
def test_a_mesh_that_does_not_fill_the_target_is_one_error_line(meshes, message, capsys, tmp_path, monkeypatch,
                                                                 no_host_changes):
    monkeypatch.setattr(aot, "check_plugin", lambda target: None)
    line = _error_line(["--aot", "a100:1x1x8", "--config", "configs/vla_cabin.py:tiny", "--meshes", meshes,
                        "--out", str(tmp_path)], capsys)
    assert message in line


def test_the_default_mesh_is_the_configs_over_the_targets_devices():
    from configs.vla_cabin import get_config

    cfg = get_config("a100x128")
    assert aot.resolve_mesh(cfg, aot.parse_target("a100:16x1x8"), None) == (128, 1, 1)
    assert aot.resolve_mesh(cfg, aot.parse_target("tpu:v5p-128"), (16, 4, 1)) == (16, 4, 1)


def test_collectives_count_once_per_channel_id():
    groups = ((0, 1), (2, 3))
    colls = [hlo.Collective("all-reduce", 100.0, groups, 1, "ar.0", channel_id=7),
             hlo.Collective("all-reduce", 100.0, groups, 1, "ar.1", channel_id=7),  # same collective, 2 fusions
             hlo.Collective("all-reduce", 40.0, groups, 3, "ar.2", channel_id=8),  # in a 3-trip loop
             hlo.Collective("reduce-scatter", 64.0, groups, 1, "rs", channel_id=None),
             hlo.Collective("all-gather", 9.0, ((0,), (1,)), 1, "ag", channel_id=9)]  # groups of one: nothing
    kinds = hlo.by_channel(colls)
    assert kinds["all-reduce"] == {"ops": 2, "executions": 4, "bytes": 220.0}
    assert kinds["reduce-scatter"]["ops"] == 1 and kinds["all-gather"]["ops"] == 0


def test_channel_ids_are_read_from_hlo():
    text = """HloModule m, num_partitions=4

ENTRY %main (p: f32[8]) -> f32[2] {
  %p = f32[8]{0} parameter(0)
  %rs-start = ((f32[8]{0}), f32[2]{0}) reduce-scatter-start(%p), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %rs-done = f32[2]{0} reduce-scatter-done(%rs-start)
}
"""
    (c,) = hlo.collectives(text)
    assert (c.kind, c.channel_id, c.bytes) == ("reduce-scatter", 5, 32.0)


def _row(fits=True) -> dict:
    memory = {"argument_bytes": 30 * 2**30, "output_bytes": 29 * 2**30, "temp_bytes": 10 * 2**30,
              "alias_bytes": 29 * 2**30, "total_bytes": 40 * 2**30}
    colls = {k: {"ops": 0, "executions": 0, "bytes": 0.0, "axes": []} for k in hlo.KINDS}
    colls["reduce-scatter"] = {"ops": 40, "executions": 40, "bytes": 2.0 * 2**30, "axes": ["data"]}
    return {"target": "a100:16x1x8", "mesh": "128x1x1", "per_device_batch": 8.0, "fits": fits,
            "programs": {"train_step": {"compile_s": 80.0, "memory": memory, "hlo_flops": 1e13,
                                        "collectives": colls},
                         "infer": {"compile_s": 3.0, "error": "boom", "out_of_memory": False}},
            "bytes_per_device": memory["total_bytes"], "usable_bytes": 60 * 2**30, "mem_fraction": 0.75,
            "device_memory_bytes": 80 * 2**30, "headroom_bytes": 20 * 2**30,
            "collective_bytes": {k: v["bytes"] for k, v in colls.items()},
            "analytic_bytes": {"all-reduce": 1.0 * 2**30},
            "flops": {"model_per_device": 2e13, "hlo_per_device": 1e13, "hlo_over_model": 0.5,
                      "peak_bf16_per_device": 312e12}}


def test_rows_print_the_verdict_and_write_json_and_png(tmp_path):
    from vlacabin_jax.perf.bench.deviceless import row_lines

    text = "\n".join(row_lines(_row()))
    assert "40.0 GiB of 60.0 usable" in text and "FITS" in text and "reduce-scatter" in text
    assert "infer      FAILED after 3 s: boom" in text
    aot.write_results(tmp_path, [_row(), {**_row(False), "mesh": "16x8x1"}], "configs/vla_cabin.py:a100x128")
    rows = json.loads((tmp_path / "aot.json").read_text())["rows"]
    assert {"target", "mesh", "bytes_per_device", "device_memory_bytes", "fits", "collective_bytes"} <= set(rows[0])
    assert [r["fits"] for r in rows] == [True, False] and (tmp_path / "aot.png").stat().st_size > 0


def test_a_tpu_loop_without_known_trip_count_counts_its_condition():
    """libtpu writes no known_trip_count; the scan's condition `i < 27` gives it."""
    text = """HloModule m, num_partitions=2

%cond (p: (s32[], f32[4])) -> pred[] {
  %c = s32[]{:T(128)} constant(27)
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (q: (s32[], f32[4])) -> (s32[], f32[4]) {
  %q = (s32[], f32[4]) parameter(0)
  %x = f32[4]{0} get-tuple-element(%q), index=1
  %ar = f32[4]{0} all-reduce(%x), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %t = (s32[], f32[4]) tuple(%j, %ar)
}

ENTRY %main (a: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = (s32[], f32[4]) parameter(0)
  ROOT %w = (s32[], f32[4]) while(%a), condition=%cond, body=%body
}
"""
    (c,) = hlo.collectives(text)
    assert (c.count, c.channel_id, c.bytes) == (27, 3, 16.0)


def test_cpu_targets_parse_and_have_no_memory_verdict():
    t = aot.parse_target("cpu:128")
    assert (t.platform, t.num_devices, t.device_memory_bytes) == ("cpu", 128, 0)
    aot.check_plugin(t)  # XLA:CPU needs no plugin
    with pytest.raises(aot.AotError, match="write cpu:N"):
        aot.parse_target("cpu:x")


def test_a_cpu_target_uses_the_running_backends_devices():
    # This process's backend runs 8 simulated devices (conftest): enough for cpu:8, too few for cpu:16.
    assert len(aot.cpu_devices(8)) == 8
    with pytest.raises(aot.AotError, match="xla_force_host_platform_device_count=16"):
        aot.cpu_devices(16)
