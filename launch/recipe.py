"""The staged recipe of DESIGN §3, one command: pretrain -> sft -> pairs -> align -> evaluate -> export.

    python -m launch.recipe --variant tiny --workdir runs/recipe [--config.mesh.data=1 ...]

Each stage is the ordinary command, run as a subprocess, each starting from the previous stage's
checkpoint (`train.init_from`):

  1. python -m launch --config configs/stages/pretrain.py:V --workdir W/pretrain
  2. python -m launch --config configs/stages/sft.py:V --workdir W/sft --config.train.init_from=W/pretrain/checkpoints
  3. python -m tools.make_preferences --checkpoint W/sft/checkpoints --out W/pairs
         --rejected-for=violation,over_trigger
  4. python -m launch --config configs/stages/align.py:V --workdir W/align --config.train.init_from=W/sft/checkpoints
         --config.data.preference_dir=W/pairs --config.data.mixture=ALIGN_MIXTURE
  5. python -m tools.evaluate --compare W/sft/checkpoints W/align/checkpoints --out W/eval
  6. python -m tools.export --checkpoint W/align/checkpoints --out W/exported

Running it again resumes: the training stages resume from their workdirs (a finished one returns at
once), pairs, evaluation and export are skipped when their output exists. `--config.*` overrides
go to all three training stages; `--steps P,S,A` sets each stage's `train.steps`. `--dry-run`
prints the commands. Exit status: that of the first failing step (2: bad arguments).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

VARIANTS = ("tiny", "small", "base", "a100x128")
# The sft policy's own answers that break a guardrail or act where nothing should happen, against
# its better answers to the same turn, plus plain VLA turns that keep the sft terms. (Unfiltered
# best-vs-worst pairs, and the world's pairs, are mostly "act" vs "<noop>": they raised
# over-triggers on tiny; docs/recipe.md.)
REJECTED_FOR = "violation,over_trigger"
ALIGN_MIXTURE = "preference_sim=1,vla=3"


def commands(variant: str, workdir: str, overrides: list[str], steps: list[int] | None = None,
             pairs: int = 6144, k: int = 8, eval_samples: int = 500, export: bool = True
             ) -> list[tuple[str, list[str], Path | None]]:
    """The recipe's steps: (name, argv, the output whose existence marks the step done; None for the
    training stages, which resume or return by themselves)."""
    w = Path(workdir).absolute()
    py = [sys.executable, "-m"]
    stage_steps = dict(zip(("pretrain", "sft", "align"), steps or []))

    def train(stage: str, *extra: str) -> tuple[str, list[str], None]:
        argv = py + ["launch", "--config", f"configs/stages/{stage}.py:{variant}", "--workdir", str(w / stage),
                     *extra, *overrides]
        if stage in stage_steps:
            argv.append(f"--config.train.steps={stage_steps[stage]}")
        return stage, argv, None

    out = [train("pretrain"),
           train("sft", f"--config.train.init_from={w / 'pretrain' / 'checkpoints'}"),
           ("pairs", py + ["tools.make_preferences", "--checkpoint", str(w / "sft" / "checkpoints"),
                           "--out", str(w / "pairs"), "--num-samples", str(pairs), "--k", str(k),
                           f"--rejected-for={REJECTED_FOR}"],
            w / "pairs" / "manifest.json"),
           train("align", f"--config.train.init_from={w / 'sft' / 'checkpoints'}",
                 f"--config.data.preference_dir={w / 'pairs'}", f"--config.data.mixture={ALIGN_MIXTURE}"),
           ("evaluate", py + ["tools.evaluate", "--compare", str(w / "sft" / "checkpoints"),
                              str(w / "align" / "checkpoints"), "--num-samples", str(eval_samples),
                              "--latency-iters", "0", "--out", str(w / "eval")],
            w / "eval" / "compare.json")]
    if export:
        out.append(("export", py + ["tools.export", "--checkpoint", str(w / "align" / "checkpoints"),
                                    "--out", str(w / "exported")], w / "exported"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="tiny", help="config variant of every stage")
    parser.add_argument("--workdir", required=True, help="recipe directory: one subdirectory per step")
    parser.add_argument("--steps", default="", help="train.steps of pretrain,sft,align (default: the stage configs')")
    parser.add_argument("--pairs", type=int, default=6144, help="train turns sampled for simulator-scored pairs")
    parser.add_argument("--k", type=int, default=8, help="answers sampled per turn for the pairs")
    parser.add_argument("--eval-samples", type=int, default=500, help="heldout turns of the sft vs align comparison")
    parser.add_argument("--no-export", action="store_true", help="stop after the evaluation")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (stage fields go as --config.<section>.<field>=value)")
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    except ValueError:
        steps = []
    if steps is not None and (len(steps) != 3 or min(steps) < 1):
        parser.error(f"--steps {args.steps!r}: three positive integers, pretrain,sft,align")
    root = Path(__file__).resolve().parent.parent  # the stage configs are relative to the checkout
    for name, cmd, done in commands(args.variant, args.workdir, overrides, steps, args.pairs, args.k,
                                    args.eval_samples, not args.no_export):
        line = " ".join(shlex.quote(c) for c in cmd)
        if done is not None and done.exists():
            print(f"[recipe] {name}: {done} exists, skipped", flush=True)
            continue
        print(f"[recipe] {name}: {line}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.run(cmd, cwd=root).returncode
        if rc != 0:
            print(f"[recipe] {name} failed with exit status {rc}; fix it and run the recipe again to resume",
                  file=sys.stderr, flush=True)
            return rc
    print(f"[recipe] done: {args.workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
