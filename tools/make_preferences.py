"""Simulator-scored preference pairs from a trained policy, for the `align` stage.

    python -m tools.make_preferences --checkpoint runs/sft/checkpoints --out runs/pairs \\
        [--num-samples 2048] [--k 8] [--noise-scale 1.0] [--start 0] [--steps K]

For each of `--num-samples` VLA turns of the synthetic world's *train* split (world indices
`--start` ...; the heldout split that `tools.evaluate` measures is never used), samples `--k`
answers from the checkpoint's policy (draw 0 noise-free, the rest with the variational noise of the
latents and z0 scaled by `--noise-scale`), scores each in the cabin simulator
(`vlacabin_jax.eval.preferences.reward`: task completion, steps, over-trigger, guardrails), and
writes best-vs-worst pairs as msgpack records in ArrayRecord shards with a manifest
(`vlacabin_jax.data.preferences`). Train on them with
`--config.data.mixture=preference_sim=1,... --config.data.preference_dir=<out>`.

Exit status: 0 written, 2 on a bad argument, path or checkpoint (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_preferences", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the policy's checkpoints/ directory (or a step dir)")
    parser.add_argument("--out", required=True, help="new directory for the pair shards and manifest.json")
    parser.add_argument("--num-samples", type=int, default=2048, help="train-split VLA turns to sample on")
    parser.add_argument("--start", type=int, default=0, help="first world index of the train split")
    parser.add_argument("--k", type=int, default=8, help="answers sampled per turn (>= 2)")
    parser.add_argument("--noise-scale", type=float, default=1.0, help="scale of the variational noise (> 0)")
    parser.add_argument("--steps", type=int, default=None, help="DNFM sampler steps K (default: the config's)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per compiled sampling call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--rejected-for", default="", help="keep only pairs whose rejected answer shows one of "
                        "these (comma-separated: violation, over_trigger, under_trigger, conflict, inversion)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.k < 2 or args.num_samples < 1 or args.noise_scale <= 0 or args.batch_size < 1 or args.start < 0:
        parser.error("--k must be >= 2, --num-samples and --batch-size >= 1, --noise-scale > 0, --start >= 0")
    from vlacabin_jax.eval.preferences import REJECT_REASONS

    rejected_for = [r.strip() for r in args.rejected_for.split(",") if r.strip()]
    unknown = sorted(set(rejected_for) - set(REJECT_REASONS))
    if unknown:
        parser.error(f"--rejected-for: unknown reason {unknown[0]!r}; use {', '.join(REJECT_REASONS)}")
    if Path(args.out, "manifest.json").exists():
        print(f"error: {args.out} already holds pairs; pass a new --out", file=sys.stderr)
        return 2

    from vlacabin_jax.config import ConfigError
    from vlacabin_jax.data import pipeline, preferences
    from vlacabin_jax.eval import evaluate as E
    from vlacabin_jax.eval import preferences as P
    from vlacabin_jax.train.restore import RestoreError, checkpoint_config, restore_params

    t0 = time.perf_counter()
    try:  # the checkpoint's own config, `--config.*` overrides on top
        cfg = checkpoint_config(args.checkpoint, args.step, overrides=overrides)
        trainable, frozen = restore_params(args.checkpoint, cfg, args.step)
    except ConfigError as e:
        print(f"error: --config: {str(e).removeprefix('--config: ')}", file=sys.stderr)
        return 2
    except RestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = E.eval_samples(cfg, args.num_samples, "vla", split="train", start=args.start)
    candidates = P.sample_candidates(trainable, frozen, cfg, samples, args.k, args.noise_scale, args.steps,
                                     args.seed, args.batch_size)
    pairs, stats = P.make_pairs(samples, candidates, rejected_for)
    generator = {"source": "simulator", "checkpoint": str(Path(args.checkpoint).resolve()), "step": args.step,
                 "world": pipeline.synthetic_params(cfg), "split": "train", "start": args.start,
                 "num_samples": args.num_samples, "k": args.k, "noise_scale": args.noise_scale,
                 "sampler_steps": args.steps or int(cfg.model.dnfm.sample_steps), "seed": args.seed,
                 "rejected_for": rejected_for, "reward_weights": P.REWARD_WEIGHTS, "stats": stats}
    preferences.write_pairs(args.out, {"train": pairs}, generator)
    print(json.dumps(stats))
    print(f"wrote {len(pairs)} pairs from {len(samples)} turns x {args.k} answers to {args.out}/ "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
