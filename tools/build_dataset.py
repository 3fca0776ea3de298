"""Write a dataset directory of ArrayRecord shards (synthetic cabin world or real cabin logs).

    python -m tools.build_dataset --config configs/vla_cabin.py:tiny --out DIR --num-samples N \
        [--heldout-samples M] [--shards S] [--jsonl LOGS.jsonl] [--overwrite] [--config.data.x=v ...]

Without --jsonl it renders N train samples of the synthetic cabin world (spread evenly over the four
kinds; the same indices `make_dataset(source="synthetic")` reads with `data.synthetic_size = N`)
and M heldout samples (default `data.heldout_size`). With --jsonl it converts real logs. Each
(split, kind) gets S shards (default 1; fewer if there are fewer samples). The result is
`DIR/manifest.json` plus `{split}-{kind}-{i}-of-{n}.arrayrecord` files; the DataHash is printed.
It is written to a temporary directory next to DIR and renamed at the end, so a failed run leaves
nothing half-written. An existing non-empty DIR is refused unless --overwrite (and only replaced if
it holds a manifest.json, i.e. is a dataset directory).

The real-log JSONL schema is in `vlacabin_jax/data/real_logs.py`; the writer is
`vlacabin_jax.data.build`.

Exit status: 0 ok, 2 on a bad argument, path, log line or record (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlacabin_jax.config import ConfigError, load_config
from vlacabin_jax.data import pipeline, real_logs, records, shards
from vlacabin_jax.data.build import BuildError, build, synthetic_plan


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 on an expected error)."""
    parser = argparse.ArgumentParser(prog="python -m tools.build_dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/vla_cabin.py:VARIANT")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument("--num-samples", type=int, help="synthetic train samples (required without --jsonl)")
    parser.add_argument("--heldout-samples", type=int,
                        help="synthetic heldout samples (default data.heldout_size)")
    parser.add_argument("--shards", type=int, default=1, help="shards per (split, kind)")
    parser.add_argument("--jsonl", type=Path, help="real-log manifest (schema in this module's doc)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        try:
            cfg = load_config(args.config, extra)
        except ConfigError as e:
            raise BuildError(str(e).removeprefix("--config: ")) from e
        if args.shards < 1:
            raise BuildError("--shards must be >= 1")
        if args.jsonl is not None:
            if not args.jsonl.is_file():
                raise BuildError(f"--jsonl: no such file {args.jsonl}")
            plan, gen = real_logs.jsonl_plan(cfg, args.jsonl), real_logs.jsonl_generator(cfg, args.jsonl)
        else:
            if args.num_samples is None:
                raise BuildError("give --num-samples N (synthetic world) or --jsonl LOGS.jsonl")
            n = args.num_samples
            m = cfg.data.heldout_size if args.heldout_samples is None else args.heldout_samples
            if n < 0 or m < 0:
                raise BuildError("--num-samples and --heldout-samples must be >= 0")
            plan, gen = synthetic_plan(cfg, n, m), pipeline.synthetic_params(cfg)
        digest = build(cfg, args.out, plan, args.shards, gen, args.overwrite)
    except (BuildError, records.CorruptRecord, shards.CorruptShard, OSError) as e:
        print(f"build_dataset: error: {e}", file=sys.stderr)
        return 2
    counts = json.loads((args.out / shards.MANIFEST).read_text())["counts"]
    for split, c in counts.items():
        print(f"{split}: {sum(c.values())} samples ({', '.join(f'{k} {v}' for k, v in c.items())})")
    print(f"wrote {args.out}")
    print(f"DataHash {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
