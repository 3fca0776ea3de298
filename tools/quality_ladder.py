"""The quality ladder: train rungs on the same data, seed and steps; print and write their heldout
simulator success (overall, per request group, per K), exact match and invalid-sequence rate.

    python -m tools.quality_ladder --config configs/stages/sft.py:tiny --steps 1500 --out runs/ladder
        [--rungs features,seed,full,...] [--num-samples 1000] [--curve-every 250] [--config.a.b=v ...]

Rungs (`vlacabin_jax.eval.ladder.RUNGS`): `features` (a plain MLP over the featurized batch, not
the model), `transformer` (a plain transformer over the batch's text, state, tag and log tokens,
no perception, not the model), `transformer_ar` (that transformer decoding one action at a time),
`seed` (the architecture before the route fixes), `seed+<fix>` (one fix alone), `full` (every
fix, the DNFM's per-setting layout included), `full_sequence` (full with the DNFM's positions as
the answer's tokens), `full_ar` (an autoregressive head on that backbone). Writes
`<out>/ladder.json` and `<out>/ladder.png` (learning curves). Exit status 2 on a bad argument,
including a `--config.` override of a field that a chosen rung sets itself (the rung would win).

`--probe speech` trains no rung: it trains the model's speech encoder alone to name the request
of a turn from its mel (`vlacabin_jax.eval.route_probe`) for --steps and writes `<out>/probe.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.quality_ladder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/stages/sft.py:tiny", help="path.py:variant")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of every rung")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--rungs", default="", help="comma-separated rung names (default: all)")
    parser.add_argument("--num-samples", type=int, default=1000, help="heldout VLA turns scored per rung")
    parser.add_argument("--ks", default="1,2,4,8", help="DNFM sampler steps K to score")
    parser.add_argument("--curve-every", type=int, default=0, help="score the learning curve every N steps (0: off)")
    parser.add_argument("--curve-samples", type=int, default=200, help="heldout turns per curve point")
    parser.add_argument("--probe", choices=("speech",), default=None,
                        help="instead of the ladder: can this route's encoder alone read the request?")
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config fields are --config.<section>.<field>=value)")
    if args.steps <= 0 or args.num_samples <= 0:
        parser.error("--steps and --num-samples must be positive")

    from vlacabin_jax.config import ConfigError, load_config
    from vlacabin_jax.eval import ladder

    names = [n for n in args.rungs.split(",") if n] or list(ladder.RUNGS)
    unknown = [n for n in names if n not in ladder.RUNGS]
    if unknown:
        parser.error(f"--rungs: unknown rung {unknown[0]!r}; rungs: {', '.join(ladder.RUNGS)}")
    conflicts = [] if args.probe else ladder.override_conflicts(names, rest)
    if conflicts:
        rung, field = conflicts[0]
        parser.error(f"--config.{field}: rung {rung!r} sets this field itself, so the override would be ignored; "
                     f"drop it, or pick rungs that leave it alone (`ladder.RUNGS`)")
    try:
        ks = [int(k) for k in args.ks.split(",")]
        if not all(1 <= k <= 8 for k in ks):
            raise ValueError
    except ValueError:
        parser.error(f"--ks {args.ks!r}: comma-separated sampler steps in 1..8")
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.probe == "speech":
        from vlacabin_jax.eval import route_probe

        probe = route_probe.speech_probe(cfg, args.steps, num_heldout=args.num_samples)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in probe.items()))
        (args.out / "probe.json").write_text(json.dumps(dict(probe, config=args.config, overrides=rest), indent=1))
        print(f"wrote {args.out / 'probe.json'}")
        return 0
    result = ladder.run_ladder(cfg, names, args.steps, args.num_samples, ks, args.curve_every, args.curve_samples)
    result["config"] = args.config
    result["overrides"] = rest
    print(ladder.table(result))
    (args.out / "ladder.json").write_text(json.dumps(result, indent=1))
    ladder.plot(result, str(args.out / "ladder.png"))
    print(f"wrote {args.out / 'ladder.json'} and {args.out / 'ladder.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
