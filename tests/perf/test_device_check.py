"""The device check (`bash tools/device_check.sh`, `vlacabin_jax/perf/bench/device_check.py`): its
plan and budget with stand-in workers (no compile). The real run on the CPU (`--smoke`, minutes: one
worker and compile per section) is a documented check in docs/performance.md, not a unit test."""
from __future__ import annotations

import json
import math

import pytest

from vlacabin_jax.perf.bench import device_check as dc

TINY = "configs/vla_cabin.py:tiny"


def _train_result(step_s: float) -> dict:
    return {"median_step_s": step_s, "samples_per_s": 2 / step_s, "mfu": None, "model_flops_per_step": 1e9,
            "compile_s": 3.0, "loss": 5.0, "platform": "cpu", "device_kind": "cpu",
            "memory": {"peak_bytes": 100 * 2**20}, "allocator": {}, "host_peak_rss_bytes": 300 * 2**20}


def test_plan_runs_the_configs_remat_first_and_every_section():
    from vlacabin_jax.config import load_config

    base = dc.plan(load_config("configs/vla_cabin.py:base", []), smoke=False)
    assert [s["name"] for s in base] == ["remat_none", "remat_dots", "remat_full", "attention_cudnn", "inference",
                                         "vs_torch"]
    assert base[3]["overrides"] == ["--config.model.remat=False", "--config.model.attention_impl=cudnn"]
    assert base[4]["ks"] == "1,2,4,8" and base[5]["torch_modes"] == "eager,compile"
    assert "--config.model.remat=False" in base[4]["overrides"] and "--config.model.remat=False" in base[5]["overrides"]
    tiny = dc.plan(load_config(TINY, []), smoke=True)
    assert tiny[0]["name"] == "remat_none" and tiny[4]["ks"] == "1,2" and tiny[5]["torch_modes"] == "eager"


def test_one_failure_or_timeout_loses_only_itself_and_the_budget_bounds_the_run(monkeypatch, tmp_path, capsys):
    """Each sub gets min(its share, what is left); a timed-out sub keeps its compiled estimate; a
    sub that no longer fits is skipped; the JSON holds every section either way."""
    calls = []
    clock = {"t": 0.0}
    monkeypatch.setattr(dc.time, "perf_counter", lambda: clock["t"])

    def fake(argv, devices, cache, timeout, retries, label, *rest):
        calls.append((label, timeout))
        clock["t"] += timeout if label == "remat_dots" else 12.0
        if label == "remat_dots":
            return {"error": f"timed out after {timeout:.0f} s", "compiled": {"memory": {"peak_bytes": 7}}}
        if label == "attention_cudnn":
            return {"error": "error: model.attention_impl=cudnn needs an NVIDIA GPU"}
        if label == "inference":
            return {"decisions": {"backbone": {"median_s": 0.01}, "dnfm_K1": {"median_s": 0.012},
                                  "autoregressive": {"median_s": 0.05}}, "platform": "cpu", "device_kind": "cpu"}
        if label == "vs_torch":
            return {"jax": {"median_step_s": 0.1}, "torch_eager": {"median_step_s": 0.12}, "torch_device": "cpu"}
        return _train_result(0.05)

    monkeypatch.setattr(dc, "run_worker", fake)
    assert dc.device_check(TINY, tmp_path, global_batch=2, steps=1, budget_s=100.0, smoke=True, log=lambda s: None) == 0
    assert [c[0] for c in calls] == ["remat_none", "remat_dots", "remat_full", "attention_cudnn", "inference",
                                     "vs_torch"]
    assert [c[1] for c in calls[:5]] == [pytest.approx(22.0)] * 5  # each its share of the budget
    assert calls[5][1] == pytest.approx(100 - (12 + 22 + 12 + 12 + 12))  # less than its 33: what was left
    got = json.loads((tmp_path / "device_check.json").read_text())
    s = got["sections"]
    assert set(dc.SECTIONS) <= set(s)
    assert s["remat"]["dots"]["error"].startswith("timed out") and s["remat"]["full"]["median_step_s"] == 0.05
    assert s["memory"]["remat_dots"]["estimate_bytes"] == 7  # the compiled figure outlives the timeout
    assert s["memory"]["remat_none"]["measured_over_estimate"] == pytest.approx(3.0)
    assert s["attention"]["xla"] == s["remat"]["none"] and "NVIDIA GPU" in s["attention"]["cudnn"]["error"]
    assert got["failed"] == ["remat_dots", "attention_cudnn"]
    table = capsys.readouterr().out
    assert "remat dots       FAILED: timed out" in table and "inference, batch 1" in table

    calls.clear()
    clock["t"] = 0.0
    monkeypatch.setattr(dc, "run_worker", lambda argv, d, c, timeout, r, label, *rest: (
        calls.append(label), clock.__setitem__("t", 45.0), _train_result(0.05))[-1])
    assert dc.device_check(TINY, tmp_path, global_batch=2, steps=1, budget_s=50.0, smoke=True, log=lambda s: None) == 0
    skipped = json.loads((tmp_path / "device_check.json").read_text())["sub_measurements"]
    assert calls == ["remat_none"] and sum(v.get("skipped", False) for v in skipped.values()) == 5
