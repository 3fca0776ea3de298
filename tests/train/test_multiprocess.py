"""Multi-process runs and faults, with real processes: 2 JAX processes x 4 simulated CPU devices
joined by gloo on 127.0.0.1 (`python -m launch.local`), against the 1-process 8-device reference.

One workdir goes through every stage, so each restart also proves that the one before left a
usable run behind:

  A  2 processes, fresh; SIGTERM to all   losses = reference; disjoint data slices; both agree on
                                          a step, save it once, exit 0
  B  2 processes resume; process 1 is     the launcher stops the other process and names the
     SIGKILLed while an (async) save is   cause; the partial save is left on disk
     being written, mid-step
  C  1 process restarts, then SIGTERM     2 -> 1 readability; the newest complete checkpoint is
                                          used, the partial one dropped; saves and exits 0
  D  2 processes restart from C's         1 -> 2 readability; the heartbeat timeout stops the run
     checkpoint, one frozen (SIGSTOP)     with a clear error instead of hanging; no checkpoint
     while compiling                      damaged
  and then every step's loss in the workdir equals the uninterrupted reference.

A full disk during a save is a separate 1-process run on a small tmpfs.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train import runs
from vlacabin_jax import sharding
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import state as state_lib

pytestmark = pytest.mark.xdist_group("multiprocess")  # may run beside the train_loop group
TMP = ".orbax-checkpoint-tmp"


def _complete_steps(workdir) -> list[int]:
    ckpts = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / ckpt_lib.CHECKSUMS).exists())


def _partial(workdir) -> list[str]:
    ckpts = Path(workdir) / "checkpoints"
    return [p.name for p in ckpts.iterdir() if TMP in p.name] if ckpts.is_dir() else []


def _resumed_from(workdir) -> int:
    resumed = [e["event"] for e in runs.events(workdir) if e["event"].startswith("resumed from checkpoint")]
    return int(resumed[-1].split()[3])


def _assert_losses_equal(workdir, want, steps):
    got = runs.rows(workdir)
    for s in steps:  # gloo's cross-process all-reduce sums in another order than one process does
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=1e-5, err_msg=f"step {s}")


def test_two_processes_through_kills_preemption_and_a_hung_peer(reference, tmp_path):
    ref_dir, _, want = reference
    work = tmp_path / "run"
    procs = []
    try:
        # A: 2 processes from scratch; SIGTERM to the launcher (as SLURM sends it): both agree on a
        # step through JAX's preemption sync, save it and exit 0.
        procs.append(runs.start(work, processes=2, **{"checkpoint.every_steps": 4}))
        runs.wait_for(procs[-1], lambda: runs.latest_row_step(work) >= 6, timeout=900)
        t0 = time.monotonic()
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(timeout=120) == 0, runs.log_of(work)[-3000:]
        print(f"\n2 processes: SIGTERM to exit 0 in {time.monotonic() - t0:.1f} s")
        saved_a = ckpt_lib.read_metadata(work / "checkpoints")["step"]
        preempted = [e for e in runs.events(work) if e["event"].startswith("preempted")]
        assert preempted and preempted[-1]["step"] == saved_a >= 6
        _assert_losses_equal(work, want, range(1, saved_a + 1))
        ref_ids = runs.sample_ids(ref_dir, 0)
        p0, p1 = runs.sample_ids(work, 0), runs.sample_ids(work, 1)
        for s in range(1, saved_a + 1):  # each process its own half of the global batch, together all of it
            assert len(p0[s]) == len(p1[s]) == 8 and not set(p0[s]) & set(p1[s])
            assert p0[s] + p1[s] == ref_ids[s]
        assert ckpt_lib.read_metadata(work / "checkpoints")["process_count"] == 2
        assert max(_complete_steps(work)) == saved_a and not _partial(work)  # written once, complete

        # B: 2 processes continue, saving every step; SIGKILL process 1 while a save is being
        # written (asynchronously: also mid-step).
        resumes = len([e for e in runs.events(work) if e["event"].startswith("resumed")])
        procs.append(runs.start(work, processes=2, **{"checkpoint.every_steps": 1}))
        runs.wait_for(procs[-1], lambda: bool(_partial(work)) and len(
            [e for e in runs.events(work) if e["event"].startswith("resumed")]) > resumes and
            runs.latest_row_step(work) > saved_a, timeout=900, poll=0.002)
        os.kill(runs.trainer_pid(procs[-1], 1), signal.SIGKILL)
        assert procs[-1].wait(timeout=120) != 0
        assert _resumed_from(work) == saved_a
        assert "error: process 1 died (signal SIGKILL)" in runs.log_of(work)
        assert _partial(work), "the save finished before the kill landed"
        newest = max(_complete_steps(work))

        # C: restart as 1 process: the newest complete checkpoint (of 2 processes) is used, the
        # partial one dropped, the lost steps run again; SIGTERM saves and exits 0.
        procs.append(runs.start(work, **{"checkpoint.every_steps": 4}))
        runs.wait_for(procs[-1], lambda: runs.latest_row_step(work) >= newest + 2, timeout=600)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(timeout=120) == 0, runs.log_of(work)[-3000:]
        assert _resumed_from(work) == newest and not _partial(work)
        saved_c = ckpt_lib.read_metadata(work / "checkpoints")["step"]
        assert saved_c >= newest + 2 and ckpt_lib.read_metadata(work / "checkpoints")["process_count"] == 1

        # D: restart as 2 processes from the 1-process checkpoint; freeze process 1 while it
        # compiles (process 0 loads the step from its cache and waits for it). The coordination
        # service misses its heartbeats for 5 s and stops the run; the launcher names the process.
        resumes = len([e for e in runs.events(work) if e["event"].startswith("resumed")])
        procs.append(runs.start(work, processes=2, flags=["--heartbeat_timeout_s=5"]))
        runs.wait_for(procs[-1], lambda: len([e for e in runs.events(work) if e["event"].startswith("resumed")])
                      > resumes, timeout=600)
        os.kill(runs.trainer_pid(procs[-1], 1), signal.SIGSTOP)
        t0 = time.monotonic()
        assert procs[-1].wait(timeout=180) != 0
        print(f"2 processes: frozen peer detected, run stopped after {time.monotonic() - t0:.1f} s")
        assert "error: process 1 stopped sending heartbeats" in runs.log_of(work)
        assert _resumed_from(work) == saved_c and max(_complete_steps(work)) == saved_c
        assert all(ckpt_lib.checksum_problem(work / "checkpoints" / str(s)) is None for s in _complete_steps(work))

        # Every step ever logged (the last time it ran) equals the uninterrupted run.
        _assert_losses_equal(work, want, sorted(runs.rows(work)))
    finally:
        for proc in procs:
            runs.stop(proc)


SMALL_DISK = """mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97
shift 2; "$@"; status=$?
cp -a "$CKPT/." "$CKPT.copy/"; exit $status"""


def test_disk_full_during_a_save_loses_no_checkpoint(reference, tmp_path):
    """`checkpoints/` on a tmpfs with room for one and a half checkpoints (in a private mount
    namespace): the second save fails with a clear error, exit 1, and the first stays good."""
    if not shutil.which("unshare"):
        pytest.fail("this test needs `unshare` (util-linux) to mount a small tmpfs")
    ref_dir, _, _ = reference
    step_dir = ref_dir / "checkpoints" / str(runs.STEPS)
    size_kib = int(1.5 * sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file()) / 1024)
    work = tmp_path / "run"
    ckpt = work / "checkpoints"
    ckpt.mkdir(parents=True)
    (work / "checkpoints.copy").mkdir()
    trainer = [sys.executable, "-m", "launch", "--config", "configs/vla_cabin.py:tiny", "--workdir", str(work),
               *[f"--config.{k}={v}" for k, v in {**runs.OVERRIDES, "mesh.data": 8,
                                                  "checkpoint.every_steps": 3}.items()]]
    cmd = ["unshare", "-rm", "sh", "-c", SMALL_DISK, "sh", f"{size_kib}k", str(ckpt), *trainer]
    out = subprocess.run(cmd, cwd=runs.REPO, env=dict(os.environ, CKPT=str(ckpt)), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode != 97, f"could not mount a tmpfs: {out.stderr[-2000:]}"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-3000:]
    assert "No space left on device" in errors[0] and "the newest complete checkpoint (step 1) is intact" in errors[0]
    # What was on the full disk: step 1 complete and verified; the failed save only as a temporary dir.
    saved = work / "checkpoints.copy"
    assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == ["1"]
    assert ckpt_lib.checksum_problem(saved / "1") is None and (saved / "1" / ckpt_lib.CHECKSUMS).exists()
    # It restores.
    cfg = runs.config()
    abstract, shardings = state_lib.state_shardings(cfg, sharding.make_mesh(cfg.mesh))
    checkpointer = ckpt_lib.Checkpointer(saved, cfg, mesh_shape={}, data_hash="unused", read_only=True)
    assert checkpointer.steps() == [1]
    restored = checkpointer.restore(1, state_lib.abstract_with_shardings(abstract, shardings))
    checkpointer.close()
    assert int(restored.state.step) == 1 and restored.data["next_batch"] == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.trainable))
