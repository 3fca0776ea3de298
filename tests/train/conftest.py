"""The uninterrupted reference run that the loop and multi-process tests compare losses with."""

import dataclasses
import json
import os

import pytest
from filelock import FileLock

from tests.train import runs
from vlacabin_jax.train import loop


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One uninterrupted run of `runs.config()` on the 8x1x1 mesh, with evaluation at 40 and 80.

    Computed once per test session: by whichever xdist worker asks first (the other waits on the
    lock), in a directory the workers share. Returns (workdir, Summary, rows by step).
    """
    base = tmp_path_factory.getbasetemp()
    workdir = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "train-reference"
    with FileLock(f"{workdir}.lock"):
        done = workdir / "summary.json"
        if not done.exists():
            summary = loop.train(runs.config(**{"train.eval_every": 40, "train.eval_batches": 2,
                                                "train.eval_cabin_samples": 16}), workdir)
            done.write_text(json.dumps(dataclasses.asdict(summary)))
    summary = loop.Summary(**json.loads(done.read_text()))
    return workdir, summary, runs.rows(workdir)
