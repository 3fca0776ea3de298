"""Throughput of the input pipeline alone (no model): samples/s per config, worker count and source.

    python -m tools.data_bench [--configs tiny,small] [--workers 0,1,2] [--sources synthetic,shards]
                               [--batch-size 32] [--batches 30] [--samples 1024]
    python -m tools.data_bench --bytes --configs tiny,base,a100x128   # host -> device bytes per step

For every (config, source, workers) it builds the `make_dataset` iterator, waits for the first batch
(start-up: worker spawn, first reads), then times `--batches` more and prints a table of samples/s.
"shards" first writes `--samples` synthetic samples with `vlacabin_jax.data.build` to a temporary
directory; "synthetic" renders the world on the fly. Compare the figures with the trainer's
samples/s: the pipeline must stay well ahead of it.

`--bytes` measures nothing: per config it prints the bytes one global batch
(`train.global_batch_size`) moves host -> device per step (`spec.transfer_bytes`), the frames'
share, and the same with float32 frames (the batch contract before frames moved as uint8).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from vlacabin_jax.config import load_config
from vlacabin_jax.data import build, pipeline, spec


def measure(cfg, source: str, workers: int, batch_size: int, batches: int, warmup: int = 5
            ) -> tuple[float, float]:
    """(start-up seconds to the first batch, samples/s over `batches` batches after `warmup` more,
    so that the buffers filled during start-up do not flatter the rate)."""
    t0 = time.perf_counter()
    it = pipeline.make_dataset(cfg, split="train", process_index=0, process_count=1,
                               global_batch_size=batch_size, seed=0, source=source,
                               num_workers=workers)
    try:
        next(it)
        startup = time.perf_counter() - t0
        for _ in range(warmup):
            next(it)
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)
        t2 = time.perf_counter()
    finally:
        it.close()
    return startup, batches * batch_size / (t2 - t1)


def print_bytes(config_file: str, variants: list[str]) -> None:
    """The host -> device bytes per step of each variant's global batch (see the module docstring)."""
    print(f"{'config':9} {'batch':>6} {'GB/step':>8} {'frames GB':>9} {'frames %':>8} {'f32 frames GB/step':>18} "
          f"{'ratio':>6}")
    for variant in variants:
        cfg = load_config(f"{config_file}:{variant}")
        b = int(cfg.train.global_batch_size)
        sizes = spec.transfer_bytes(cfg, b)
        total, frames = sum(sizes.values()), sizes["frames"]
        as_float = total + frames * (4 - 1)  # float32 frames: 4 bytes a value instead of 1
        print(f"{variant:9} {b:6d} {total / 1e9:8.3f} {frames / 1e9:9.3f} {100 * frames / total:8.1f} "
              f"{as_float / 1e9:18.3f} {as_float / total:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.data_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="configs/vla_cabin.py")
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--sources", default="synthetic,shards")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--samples", type=int, default=1024, help="train samples per shard build")
    parser.add_argument("--bytes", action="store_true", help="print host -> device bytes per step and exit")
    args = parser.parse_args(argv)
    if args.bytes:
        print_bytes(args.config_file, args.configs.split(","))
        return 0
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{'config':8} {'source':10} {'workers':>7} {'startup s':>10} {'samples/s':>10}")
    with tempfile.TemporaryDirectory(prefix="data_bench-") as tmp:
        for variant in args.configs.split(","):
            cfg = load_config(f"{args.config_file}:{variant}")
            # Same indices for both sources: the synthetic epoch is the shard count.
            cfg.data.synthetic_size = args.samples
            for source in args.sources.split(","):
                if source == "shards":
                    out = Path(tmp, variant)
                    plan = build.synthetic_plan(cfg, args.samples, 0)
                    build.build(cfg, out, plan, 4, pipeline.synthetic_params(cfg), progress=False)
                    src = str(out)
                else:
                    src = "synthetic"
                for w in workers:
                    startup, rate = measure(cfg, src, w, args.batch_size, args.batches)
                    print(f"{variant:8} {source:10} {w:>7} {startup:>10.2f} {rate:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
