"""`python -m tools.mesh_bench`: bad input fails with one line and exit code 2; the PyTorch
training loss and the autoregressive head's config are sound (cheap: no train-step compile)."""
from __future__ import annotations

import math

import pytest

from tools import mesh_bench
from vlacabin_jax.perf.bench import common


@pytest.mark.parametrize("argv, message", [
    (["--meshes", "8x1"], "is not DATAxFSDPxTENSOR"),
    (["--meshes", "4x4x1"], "needs 16 devices but 8 are available"),
    (["--meshes", "1x1x3"], "does not divide"),
    (["--devices", "1,two"], "comma-separated list of integers"),
    (["--steps", "0"], "--steps 0"),
    (["--config", "configs/nope.py:tiny"], "--config configs/nope.py:tiny"),
])
def test_bad_input_is_one_error_line(argv, message, capsys, tmp_path):
    assert mesh_bench.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_worker_env_sets_devices_and_cpu_timeouts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
    env = common.worker_env(4, "/tmp/cache")
    flags = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=4" in flags and "--xla_dump_to=/tmp/x" in flags
    assert "--xla_force_host_platform_device_count=8" not in flags
    assert all(f in flags for f in common.CPU_FLAGS) and env["MESH_BENCH_CACHE"] == "/tmp/cache"


def test_torch_training_loss_trains_only_the_trainable_part():
    from configs.vla_cabin import get_config
    from vlacabin_jax.export.convert import mirror_config
    from vlacabin_jax.perf import torch_train

    cfg = get_config("tiny")
    cfg.model.dtype = "float32"
    config = mirror_config(cfg, 2)
    model = torch_train.MirrorTrainer(config)
    loss, terms = model.loss(torch_train.training_inputs(config, 2))
    assert set(terms) == set(torch_train.LOSS_TERMS) and math.isfinite(float(loss.detach()))
    loss.backward()
    assert all(p.grad is None for p in model.mirror.vit.parameters())
    assert all(p.grad is None for p in model.mirror.lm.parameters())
    assert model.mirror.dnfm.in_proj.weight.grad is not None
    assert model.mirror.speech_encoder.conv_0.weight.grad is not None  # through the frozen LM


def test_autoregressive_head_is_sized_like_the_dnfm():
    from configs.vla_cabin import get_config
    from vlacabin_jax.perf.autoregressive import ar_model_config

    m = get_config("small").model
    c = ar_model_config(m)
    assert (c.explain.width, c.explain.depth, c.explain.vocab_size) == (m.dnfm.width, m.dnfm.depth,
                                                                        m.dnfm.vocab_size)
    assert c.explain_len == m.action_len + 1 and m.explain.vocab_size != c.explain.vocab_size


def test_failure_line_prefers_the_fatal_log_line_over_stack_frames():
    stderr = ("W0000 noise\nF1201 00:01:02 12 cpu_collectives.cc:99] Termination timeout of 10 s exceeded\n"
              "*** Check failure stack trace: ***\n    @     0x7f00 (unknown)\n")
    assert "Termination timeout" in common.failure_line(stderr, -6)
    assert common.failure_line("", -9) == "exit code -9"
    long = ("F1201 cpu_collectives.cc:99] Termination timeout for `all gather RendezvousKey{" + "x" * 400
            + "}` exceeded. Expected 2 threads to join the rendezvous, but only 1 of them arrived on time.")
    line = common.failure_line(long, -6)
    assert len(line) <= 300 and "Termination timeout" in line and line.endswith("arrived on time.")


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tools.mesh_bench", "--meshes", "9x1x1", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: mesh 9x1x1 needs 9 devices")


def test_a_mesh_that_compiles_but_deadlocks_keeps_its_compiled_figures(monkeypatch, tmp_path):
    import json
    import subprocess

    import matplotlib.pyplot  # noqa: F401 - a cold font cache runs fc-list through the subprocess.run faked below

    from vlacabin_jax.perf.bench.meshes import sweep_table

    compiled = {"compile_s": 612.0, "compile_cache_hit": False, "memory": {"peak_bytes": 300 * 2**20},
                "hlo_flops": 1e12, "collectives": [{"kind": "all-reduce", "bytes": 2e6, "count": 3, "group_size": 2,
                                                    "axes": ["data"]}]}
    attempts = []

    def deadlocking_worker(cmd, **kwargs):
        attempts.append(cmd)
        stdout = "loading\n" + common.COMPILED_PREFIX + json.dumps(compiled) + "\n"
        if len(attempts) == 2:  # the second attempt is killed before it prints its analysis
            raise subprocess.TimeoutExpired(cmd, 5.0, output=b"loading\n")
        return subprocess.CompletedProcess(cmd, -6, stdout, "F1201 cpu_collectives.cc:99] Termination timeout\n")

    monkeypatch.setattr(common.subprocess, "run", deadlocking_worker)
    result = common.run_worker(["--mesh", "2x2x2"], 8, "none", 5.0, 2, "small 2x2x2")
    assert len(attempts) == 3 and result["attempts"] == 3 and "Termination timeout" in result["error"]
    assert result["compiled"] == compiled
    row = {**result, "mesh": "2x2x2", "analytic_bytes": {"all-reduce": 4e6}}
    table = sweep_table(None, [row], None, 64).splitlines()
    line = next(ln for ln in table if ln.startswith("2x2x2"))
    assert "300.0" in line and "612.0" in line and "6.00 (4.00)" in line  # peak MiB, compile s, AR MB
    assert line.split()[1] == "-"  # no step time
    assert "FAILED after 3 attempts" in table[table.index(line) + 1]
    # The projection takes that mesh's compiled collectives for its 128-GPU layout.
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"config": "configs/vla_cabin.py:tiny", "global_batch": 16,
                                                      "meshes": [row]}))
    assert mesh_bench.main(["--project", "--configs", "tiny", "--sweeps", str(sweep_dir),
                            "--out", str(tmp_path / "proj")]) == 0
    rows = json.loads((tmp_path / "proj" / "projection.json").read_text())["rows"]
    assert {r["source"] for r in rows if r["layout"] == "16x4x2"} == {"HLO 2x2x2"}
    assert {r["source"] for r in rows if r["layout"] == "128x1x1"} == {"analytic"}
