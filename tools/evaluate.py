"""Evaluate VLA-Cabin the way the proposal judges it: cabin-simulator metrics, retrieval, latency.

    python -m tools.evaluate --checkpoint runs/demo/checkpoints [--step N] --split heldout
    python -m tools.evaluate --random-init --config configs/vla_cabin.py:tiny     (smoke run)
    python -m tools.evaluate --policy oracle|random                              (reference policies)
    python -m tools.evaluate --compare runs/a/checkpoints runs/b/checkpoints     (side by side)

Each of the two `--compare` entries is a checkpoint directory or one of `oracle`, `random`,
`random-init`. A checkpoint is evaluated with the config saved beside it (`<step>/config`) unless
`--config` is given; fields can be overridden as `--config.model.dnfm.sample_steps=2`. Only the
params are read (never the optimizer state). The evaluation set is `--num-samples` VLA samples of
the split (heldout: world indices from `pipeline.HELDOUT_OFFSET`); models are also scored on
cross-modal retrieval (video_text / speech_text / VLA pools) and infer latency at batch 1 and
`--batch-size`.

Prints the tables, writes `<out>/metrics.json` (or `compare.json`), `per_scene_success.png` (success
per request type) and `confusion_<name>.png` (action-family confusion) per evaluated entry.
Exit status: 0 ok, 2 on a bad argument, path, checkpoint or config (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

POLICIES = ("model", "oracle", "random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="Orbax checkpoint directory (run checkpoints/, a step dir or an item dir)")
    src.add_argument("--random-init", action="store_true", help="untrained params (smoke run)")
    src.add_argument("--compare", nargs=2, metavar=("A", "B"),
                     help="two checkpoints (or oracle / random / random-init) side by side")
    parser.add_argument("--policy", choices=POLICIES, default=None,
                        help="model (default with --checkpoint / --random-init), oracle or random")
    parser.add_argument("--config", default=None,
                        help="config file:variant (default: the checkpoint's saved config, else "
                             "configs/vla_cabin.py:tiny)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--num-samples", type=int, default=500, help="VLA samples to evaluate")
    parser.add_argument("--retrieval-samples", type=int, default=256,
                        help="pool size per retrieval pair (video_text / speech_text / vla samples)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per compiled infer call")
    parser.add_argument("--steps", type=int, default=None, help="DNFM sampler steps K (default: config)")
    parser.add_argument("--latency-iters", type=int, default=50, help="timed infer calls per batch size (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="random policy / random-init seed")
    parser.add_argument("--failures", type=int, default=5, help="failed examples printed and saved")
    parser.add_argument("--out", default=None,
                        help="output directory (default: <run>/eval for <run>/checkpoints, else runs/eval/<names>)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")

    if args.compare:
        entries = list(args.compare)
    elif args.checkpoint or args.random_init:
        if args.policy not in (None, "model"):
            parser.error(f"--policy {args.policy} takes no --checkpoint / --random-init")
        entries = [args.checkpoint or "random-init"]
    elif args.policy in ("oracle", "random"):
        entries = [args.policy]
    else:
        parser.error("give --checkpoint DIR, --random-init, --policy oracle|random, or --compare A B")
    if min(args.num_samples, args.batch_size) < 1 or args.retrieval_samples < 0:
        parser.error("--num-samples and --batch-size must be >= 1, --retrieval-samples >= 0")

    from vlacabin_jax.config import ConfigError
    from vlacabin_jax.data import pipeline
    from vlacabin_jax.eval import evaluate as E
    from vlacabin_jax.eval import report
    from vlacabin_jax.train.restore import RestoreError, checkpoint_config

    for e in entries:
        if e not in E.SPECIAL and not Path(e).is_dir():
            print(f"error: checkpoint {e}: no such directory", file=sys.stderr)
            return 2
    cache: dict[str, tuple[list, list]] = {}  # eval sets per generator parameters (shared by entries)
    results = []
    try:
        for e in entries:
            cfg = checkpoint_config(None if e in E.SPECIAL else e, args.step, args.config, overrides)
            key = json.dumps(pipeline.synthetic_params(cfg), sort_keys=True)
            if key not in cache:
                cache[key] = (E.eval_samples(cfg, args.num_samples, "vla", args.split), [])
            samples, extra = cache[key]
            if e not in ("oracle", "random") and args.retrieval_samples and not extra:
                for kind in ("video_text", "speech_text"):
                    extra += E.eval_samples(cfg, args.retrieval_samples, kind, args.split)
            results.append(E.evaluate_entry(
                e, cfg, samples, extra, step=args.step, seed=args.seed, steps=args.steps,
                batch_size=args.batch_size, retrieval_pool=args.retrieval_samples, num_failures=args.failures,
                latency_iters=args.latency_iters, split=args.split))
    except ConfigError as err:
        print(f"error: --config: {str(err).removeprefix('--config: ')}", file=sys.stderr)
        return 2
    except RestoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    names = E.entry_names(entries)
    out = Path(args.out) if args.out else E.default_out(entries, names)
    for res, name in zip(results, names):
        meta = res["meta"]
        print(report.format_results(res, f"== {name} ({meta['variant']}, {meta['split']}, {meta['num_samples']} "
                                         f"samples, {meta['seconds']} s)"))
        for f in res.get("failures", [])[:args.failures]:
            print(f"  fail [{f['scene']}] {f['text']!r}: target {f['target']} predicted {f['predicted']}"
                  f" — {'; '.join(f['issues'][:3])}")
        print()
        report.plot_confusion(res["confusion"], str(out / f"confusion_{name}.png"), f"action-family confusion: {name}")
    if len(results) == 2:
        print(report.format_comparison(results, names))
        report.write_json({"names": names, "results": results}, str(out / "compare.json"))
    else:
        report.write_json(results[0], str(out / "metrics.json"))
    report.plot_per_scene(results, names, str(out / "per_scene_success.png"))
    print(f"\nwrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
