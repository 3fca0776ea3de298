"""A dataset directory of ArrayRecord shards: `manifest.json` plus `{split}-{kind}-{i}-of-{n}.arrayrecord`.

    plan = synthetic_plan(cfg, n_train, n_heldout)          # or real_logs.jsonl_plan(cfg, path)
    digest = build(cfg, out, plan, num_shards, generator)   # the DataHash

A plan maps (split, kind) to (count, index -> sample dict as `world.generate` returns it). The
directory is written to a temporary directory next to `out` and renamed at the end, so a failed
build leaves nothing half-written; an existing non-empty `out` is replaced only with `overwrite`
and only if it is a dataset directory (holds a manifest).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from vlacabin_jax.data import actions, pipeline, records, shards
from vlacabin_jax.data.spec import KINDS


class BuildError(ValueError):
    """An expected failure: bad argument, path or log line."""


def synthetic_plan(cfg, n_train: int, n_heldout: int):
    """{(split, kind): (count, index -> sample)} for the synthetic world."""
    plan = {}
    for split, total in (("train", n_train), ("heldout", n_heldout)):
        counts = shards.split_counts(total)
        offset = pipeline.HELDOUT_OFFSET if split == "heldout" else 0
        for kind in KINDS:
            src = pipeline.SyntheticSource(pipeline.synthetic_params(cfg), kind, counts[kind], offset)
            plan[(split, kind)] = (counts[kind], src.__getitem__)
    return plan


def build(cfg, out: Path, plan: dict, num_shards: int, generator: dict, overwrite: bool = False,
          progress: bool = True) -> str:
    """Writes every (split, kind) of `plan` into shards under `out` (atomically); returns the DataHash."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise BuildError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not (out / shards.MANIFEST).is_file():
            raise BuildError(f"{out} has no {shards.MANIFEST}: not a dataset directory, "
                             f"refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)  # mkdtemp makes the directory private; publish it like any other dir
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        entries = []
        total = sum(count for count, _ in plan.values())
        with tqdm(total=total, unit="sample", desc=f"build {out.name}", disable=not progress) as bar:
            for (split, kind), (count, get) in plan.items():
                ranges = shards.shard_ranges(count, num_shards)
                for i, (lo, hi) in enumerate(ranges):
                    name = shards.shard_name(split, kind, i, len(ranges))

                    def data(lo=lo, hi=hi):
                        for j in range(lo, hi):
                            yield records.encode(get(j))
                            bar.update(1)

                    entries.append(dict(shards.write_shard(tmp / name, data()), split=split, kind=kind))
        manifest = shards.make_manifest(entries, generator, actions.VERSION)
        digest = shards.write_manifest(tmp, manifest)
        shards.load_manifest(tmp, verify_hashes=True)  # read back what we wrote before publishing
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        return digest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
