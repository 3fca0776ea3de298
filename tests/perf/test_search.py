"""`mesh_bench --aot TARGET --search`: candidate generation, pruning and the choice, on fake compile
results (`vlacabin_jax/perf/search.py`; nothing compiles, no AOT plugin needed), plus the output
table of the driver (`vlacabin_jax/perf/bench/layouts.py`) and its one-line errors."""
from __future__ import annotations

import pytest

from tools import mesh_bench
from vlacabin_jax.perf import search
from vlacabin_jax.perf.bench import layouts
from vlacabin_jax.perf.search import Candidate

GIB = 2**30


def test_meshes_of_128_gpus_keep_tensor_in_a_node_and_model_groups_within_two_nodes():
    meshes = search.candidate_meshes(128, 8, tensor_sizes=(1, 2, 4))
    assert meshes == [(128, 1, 1), (64, 2, 1), (32, 4, 1), (16, 8, 1), (8, 16, 1),
                      (64, 1, 2), (32, 2, 2), (16, 4, 2), (8, 8, 2),
                      (32, 1, 4), (16, 2, 4), (8, 4, 4)]
    assert all(d * f * t == 128 and f * t <= 16 for d, f, t in meshes)


def test_meshes_of_one_node_use_all_its_gpus():
    assert search.candidate_meshes(8, 8, tensor_sizes=(1, 2)) == [
        (8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2)]
    assert (1, 1, 8) in search.candidate_meshes(8, 8)  # no heads constraint given


def test_candidates_keep_the_global_batch_and_whole_microbatches():
    cands = search.candidates([(128, 1, 1), (16, 4, 2)], 1024, accums=(1, 2, 4, 16))
    a = Candidate((128, 1, 1), "none", 4)
    assert a in cands and a.rows(1024) == 8 and a.micro(1024) == 2
    assert Candidate((128, 1, 1), "none", 16) not in cands  # 8 rows per device: no microbatch of 1/2
    b = Candidate((16, 4, 2), "dots", 16)
    assert b in cands and b.rows(1024) == 16 and b.micro(1024) == 1
    assert len(cands) == 3 * 3 + 3 * 4
    assert search.candidates([(3, 1, 1)], 1024) == []  # does not divide the batch


def test_candidate_overrides_set_mesh_remat_and_accumulation():
    assert Candidate((16, 8, 1), "none", 2).overrides() == {
        "mesh.data": 16, "mesh.fsdp": 8, "mesh.tensor": 1, "model.remat": False, "model.remat_policy": "full",
        "train.grad_accum_steps": 2}
    o = Candidate((8, 1, 1), "dots", 1).overrides()
    assert o["model.remat"] is True and o["model.remat_policy"] == "dots"


def test_the_order_relates_only_meshes_of_one_tensor_size():
    fast = Candidate((128, 1, 1), "none", 1)
    assert search.at_least_as_fast(fast, Candidate((16, 8, 1), "full", 2))
    assert not search.at_least_as_fast(Candidate((16, 8, 1), "none", 1), fast)
    assert not search.at_least_as_fast(fast, Candidate((64, 1, 2), "full", 4))  # other tensor size
    assert not search.at_least_as_fast(Candidate((128, 1, 1), "none", 2), Candidate((128, 1, 1), "dots", 1))


# A fake machine: memory falls with fsdp, recompute and accumulation; step time rises with them.
def _memory(c: Candidate) -> float:
    state = 40.0 / c.mesh[1]
    act = {"none": 30.0, "dots": 16.0, "full": 6.0}[c.remat] / c.accum
    return (state + act) * GIB


def _step(c: Candidate) -> float:
    return (1.0 + 0.15 * c.recompute) + 0.02 * c.mesh[1] + 0.01 * c.accum + 0.05 * (c.mesh[2] - 1)


def _evaluate(calls):
    def evaluate(c):
        calls.append(c)
        return {"bytes_per_device": _memory(c), "usable_bytes": 60 * GIB, "step_s": _step(c), "comm_s": 0.0}
    return evaluate


def test_search_prunes_dominated_and_implied_candidates_and_picks_the_fastest_fit():
    cands = search.candidates(search.candidate_meshes(16, 8, tensor_sizes=(1,)), 64, accums=(1, 2, 4))
    calls: list = []
    records = search.run(cands, _step, None, _evaluate(calls), max_compiles=100, headroom=0.1)
    assert len(records) == len(cands)
    by_name = {r["name"]: r for r in records}
    # Exhaustive truth: the fastest candidate whose memory is within 90% of 60 GiB.
    fits = [c for c in cands if _memory(c) <= 54 * GIB]
    truth = min(fits, key=_step)
    chosen = search.select(records)
    assert chosen["name"] == truth.name == "8x2x1 none accum 1"  # 20 + 30 GiB
    # Pruning saved compiles, and every skip names a compiled candidate and a rule.
    assert len(calls) < len(cands) / 2
    skipped = [r for r in records if r["status"] == "skipped"]
    assert skipped and all(r["reason"].startswith(("dominated by", "does not fit, as")) for r in skipped)
    assert by_name["16x1x1 none accum 1"]["fits_with_headroom"] is False  # 70 GiB
    assert by_name["16x1x1 dots accum 4"]["reason"] == "dominated by 16x1x1 none accum 4"
    # No pruned candidate would have beaten the choice.
    for c in cands:
        if by_name[c.name]["status"] == "skipped" and _memory(c) <= 54 * GIB:
            assert _step(c) >= _step(truth)


def test_headroom_rules_out_a_tight_fit():
    c = Candidate((8, 1, 1), "none", 1)
    def tight(_):
        return {"bytes_per_device": 58 * GIB, "usable_bytes": 60 * GIB, "step_s": 1.0, "comm_s": 0.0}
    (r,) = search.run([c], lambda _: 0.0, None, tight, 5, headroom=0.1)
    assert r["fits_with_headroom"] is False and search.select([r]) is None
    (r,) = search.run([c], lambda _: 0.0, None, tight, 5, headroom=0.0)
    assert r["fits_with_headroom"] is True and search.select([r])["name"] == c.name


def test_a_lower_bound_and_the_compile_budget_stop_the_search():
    cands = [Candidate((1, 8, 1), "none", 1), Candidate((4, 1, 2), "none", 1), Candidate((4, 1, 2), "full", 1)]
    calls: list = []
    first = lambda c: 0.0 if c.mesh == (1, 8, 1) else 1.0  # noqa: E731  (the visiting order)
    records = search.run(cands, first, lambda c, compiled: _step(c) + 0.5, _evaluate(calls), 5, 0.1)
    assert [r["status"] for r in records] == ["compiled", "skipped", "skipped"]
    assert records[1]["reason"].startswith("cannot beat 1x8x1 none accum 1: at least")
    calls.clear()
    records = search.run(cands, first, None, _evaluate(calls), 1, 0.1)
    assert [r["status"] for r in records] == ["compiled", "skipped", "skipped"]
    assert records[1]["reason"] == "over the compile budget (1)" and len(calls) == 1


def test_a_failed_compile_prunes_nothing():
    cands = [Candidate((8, 1, 1), "none", 1), Candidate((8, 1, 1), "full", 1)]
    def evaluate(c):
        if c.remat == "none":
            return {"error": "boom", "bytes_per_device": None, "usable_bytes": 60 * GIB}
        return {"bytes_per_device": 10 * GIB, "usable_bytes": 60 * GIB, "step_s": 2.0, "comm_s": 0.1}
    records = search.run(cands, _step, None, evaluate, 5, 0.1)
    assert [r["status"] for r in records] == ["failed", "compiled"]
    assert search.select(records)["name"] == "8x1x1 full accum 1"


def test_comm_floor_is_the_most_any_faster_candidate_communicates():
    compiled = {Candidate((8, 1, 1), "none", 1): {"comm_s": 0.3}, Candidate((4, 2, 1), "none", 2): {"comm_s": 0.5},
                Candidate((4, 1, 2), "none", 1): {"comm_s": 0.9}}
    assert search.comm_floor(Candidate((8, 1, 1), "full", 2), compiled) == 0.3
    assert search.comm_floor(Candidate((2, 4, 1), "full", 2), compiled) == 0.5
    assert search.comm_floor(Candidate((2, 4, 1), "full", 1), compiled) == 0.3  # accum 1 < 2
    assert search.comm_floor(Candidate((2, 2, 2), "full", 1), compiled) == 0.9
    assert search.comm_floor(Candidate((2, 1, 4), "none", 1), compiled) == 0.0


def test_select_breaks_ties_toward_less_recompute_and_fewer_microbatches():
    rec = lambda mesh, remat, accum: {"status": "compiled", "fits_with_headroom": True, "step_s": 1.0,  # noqa: E731
                                       "mesh": mesh, "remat": remat, "accum": accum, "name": f"{mesh} {remat} {accum}"}
    assert search.select([rec("8x1x1", "full", 1), rec("8x1x1", "none", 2), rec("4x2x1", "none", 1)])["name"] == \
        "4x2x1 none 1"


def test_cluster_of_a_target():
    c = search.cluster_for("h100", 1, 8, 400.0, 989e12)
    assert (c.size, c.nvlink_GBps, c.peak_flops) == (8, 360.0, 989e12)


def test_table_marks_the_choice_and_says_why_others_were_skipped():
    proj = {"compute_s": 1.0, "nvlink_s": 0.1, "ib_s": 0.5, "latency_s": 0.01, "step_no_overlap_s": 1.61,
            "step_full_overlap_s": 1.0, "efficiency_no_overlap": 0.62, "mfu_no_overlap": 0.25}
    done = {"name": "16x8x1 none accum 1", "mesh": "16x8x1", "remat": "none", "accum": 1, "micro": 8,
            "status": "compiled", "fits_with_headroom": True, "bytes_per_device": 20 * GIB, "usable_bytes": 59 * GIB,
            "collective_bytes": {"all-gather": 30 * GIB}, "projection": {"200": proj, "400": proj}, "step_s": 1.61}
    skipped = {"name": "16x8x1 full accum 1", "mesh": "16x8x1", "remat": "full", "accum": 1, "status": "skipped",
               "reason": "dominated by 16x8x1 none accum 1"}
    meta = {"target": "a100:16x1x8", "config": "c", "global_batch": 1024, "usable_bytes": 59 * GIB,
            "headroom": 0.1, "recompute_factors": {"none": {"factor": 1.0}}, "mfu_assumed": 0.4,
            "ib_Gbps": [200.0, 400.0]}
    text = layouts.table([done, skipped], meta, done)
    assert "<- chosen" in text
    assert "skipped 1 (# = visiting order; each with its reason in search.json): 1 dominated, e.g. #2 16x8x1 " \
           "full accum 1: dominated by 16x8x1 none accum 1" in text
    assert "chosen: 16x8x1 none accum 1 (microbatch 8)" in text and "model.remat=False" in text
    assert " 30.0 " in text and "1610/1610" in text


@pytest.mark.parametrize("argv, message", [
    (["--search", "--config", "configs/vla_cabin.py:tiny"], "--search needs --aot TARGET"),
    (["--aot", "a100:1x1x8,h100:1x1x8", "--search"], "--search takes one target"),
    (["--aot", "a100:1x1x8", "--search", "--headroom", "1.5"], "--headroom 1.5"),
    (["--aot", "tpu:v4-8", "--search"], "is not a GPU target"),
])
def test_search_errors_are_one_line(argv, message, capsys, tmp_path):
    assert mesh_bench.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
