"""`python -m tools.mesh_bench`: bad input fails with one line and exit code 2; the PyTorch
training loss and the autoregressive head's config are sound (cheap: no train-step compile)."""
from __future__ import annotations

import math

import pytest

from tools import mesh_bench


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
    env = mesh_bench.worker_env(4, "/tmp/cache")
    flags = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=4" in flags and "--xla_dump_to=/tmp/x" in flags
    assert "--xla_force_host_platform_device_count=8" not in flags
    assert all(f in flags for f in mesh_bench.CPU_FLAGS) and env["MESH_BENCH_CACHE"] == "/tmp/cache"


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
    assert "Termination timeout" in mesh_bench._failure_line(stderr, -6)
    assert mesh_bench._failure_line("", -9) == "exit code -9"


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tools.mesh_bench", "--meshes", "9x1x1", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: mesh 9x1x1 needs 9 devices")
