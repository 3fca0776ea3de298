"""What the training-loop tests share: the run config, reading a workdir, and starting
`python -m launch` (one process) or `python -m launch.local` (several) as subprocesses.

Every run uses the same config (only the mesh, process count and checkpoint cadence differ), so
compiled programs are shared through the session's persistent compilation cache, and every
run's losses can be compared step by step with one uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.vla_cabin import get_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 80
# The config of every run, as command-line overrides (the subprocess tests use them verbatim).
OVERRIDES = {"model.dtype": "float32", "train.steps": STEPS, "train.global_batch_size": 16,
             "train.log_every": 1, "train.eval_every": 0, "optim.warmup_steps": 10,
             "train.log_sample_ids": True,
             # The frozen-anchor layout: loop.train refuses tiny's learning anchor across processes.
             "train.trainable": "all",
             # The loop does not depend on the DNFM's layout (tests/model and tests/export cover
             # "per_setting"); the sequence layout's step compiles and runs faster.
             "model.dnfm.layout": "sequence"}


def config(mesh=(8, 1, 1), **extra):
    """The tiny config with `OVERRIDES` and `extra` ({"section.field": value}, nested sections
    dotted too) on `mesh`."""
    cfg = get_config("tiny")
    for key, value in {**OVERRIDES, **extra}.items():
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[name] = value
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    return cfg


def rows(workdir) -> dict[int, dict]:
    """metrics.jsonl by step; a step written again (resume, rollback) counts with its last row."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row
    return out


def events(workdir) -> list[dict]:
    path = Path(workdir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sample_ids(workdir, process: int) -> dict[int, list[int]]:
    """The sample ids process `process` fed at each step (the last time it ran that step)."""
    out = {}
    for line in (Path(workdir) / "sample_ids" / f"p{process}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["sample_id"]
    return out


def latest_row_step(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def log_of(workdir) -> str:
    return Path(workdir).with_suffix(".log").read_text()


def start(workdir, processes: int = 1, flags=(), env=None, **extra) -> subprocess.Popen:
    """`python -m launch` (processes=1, 8 devices) or `python -m launch.local` (4 devices each) on
    the shared config plus `extra` overrides; output appended to `<workdir>.log`."""
    trainer = ["--config", "configs/vla_cabin.py:tiny", "--workdir", str(workdir), *flags,
               *[f"--config.{k}={v}" for k, v in {**OVERRIDES, "mesh.data": 8, **extra}.items()]]
    if processes == 1:
        cmd = [sys.executable, "-m", "launch", *trainer]
    else:
        cmd = [sys.executable, "-m", "launch.local", "--processes", str(processes), "--devices",
               str(8 // processes), "--", *trainer]
    log = open(Path(workdir).with_suffix(".log"), "a")
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ.copy())


def wait_for(proc, predicate, timeout: float = 300.0, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early with {proc.returncode}")
        time.sleep(poll)
    proc.kill()
    pytest.fail("timed out waiting for the trainer")


def trainer_pid(launcher: subprocess.Popen, process_id: int) -> int:
    """The pid of `python -m launch --process_id=<process_id>` started by `python -m launch.local`."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        if f"--process_id={process_id}" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
            return int(pid)
    raise AssertionError(f"no trainer process {process_id} among {children}")


def stop(proc: subprocess.Popen) -> None:
    """Kills a trainer left running by a failed test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
