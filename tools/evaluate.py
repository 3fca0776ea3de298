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
import re
import sys
import time
from pathlib import Path

POLICIES = ("model", "oracle", "random")
SPECIAL = ("oracle", "random", "random-init")  # entries that are not checkpoint directories
CONFIG_FILE = str(Path(__file__).resolve().parent.parent / "configs" / "vla_cabin.py")
DEFAULT_CONFIG = f"{CONFIG_FILE}:tiny"


class EvalError(Exception):
    """An expected failure (bad path, checkpoint, config): one line, exit status 2."""


def load_config(spec: str, overrides: list[str]):
    """`path.py:variant` plus `--config.a.b=value` overrides (`vlacabin_jax.config.load_config`)."""
    from vlacabin_jax.config import ConfigError, load_config as _load

    try:
        return _load(spec, overrides)
    except ConfigError as e:
        raise EvalError(f"--config: {str(e).removeprefix('--config: ')}") from e


# ---------------------------------------------------------------- checkpoints
def _steps(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def _is_pytree_item(path: Path) -> bool:
    return (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists()


def find_checkpoint_item(path: str, step: int | None = None) -> Path:
    """The Orbax pytree directory holding the params under `path`: a checkpoint manager's
    directory (`<dir>/<step>/state` of `vlacabin_jax.train.checkpoint`; latest step, or `step`),
    a step directory, or the item directory itself."""
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"--checkpoint: no such directory {path}")
    steps = _steps(p)
    # A step directory is finished once Orbax wrote its marker (the trainer's own test, too).
    steps = [s for s in steps if (p / str(s) / "_CHECKPOINT_METADATA").exists()] or steps
    if steps:
        if step is not None and step not in steps:
            raise EvalError(f"--checkpoint: step {step} not in {path} (steps: {steps})")
        p = p / str(step if step is not None else steps[-1])
    elif step is not None and not _is_pytree_item(p):
        raise EvalError(f"--checkpoint: {path} has no step directories")
    if _is_pytree_item(p):
        return p
    items = [c for c in sorted(p.iterdir()) if c.is_dir() and _is_pytree_item(c)]
    if not items:
        raise EvalError(f"--checkpoint: no Orbax checkpoint found in {p}")
    # Prefer the item that holds the train state, else the first pytree item.
    return next((c for c in items if c.name in ("state", "train_state", "params")), items[0])


def checkpoint_config(item: Path) -> dict | None:
    """The resolved config JSON saved beside the state (`<step>/config`), or None."""
    cdir = item.parent / "config"
    if not cdir.is_dir():
        return None
    for f in sorted(cdir.iterdir()):
        try:
            obj = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(obj, dict) and "model" in obj and "variant" in obj:
            return obj
    return None


def _as_overrides(saved: dict, prefix: str = "") -> list[str]:
    """A saved config → `--config.a.b=value` strings (JSON lists are the config's tuples)."""
    out = []
    for k, v in saved.items():
        if isinstance(v, dict):
            out += _as_overrides(v, f"{prefix}{k}.")
        elif k != "variant" or prefix:
            out.append(f"--config.{prefix}{k}={tuple(v)!r}" if isinstance(v, list) else f"--config.{prefix}{k}={v!r}")
    return out


def _params_metadata(item: Path) -> tuple[dict, dict, list[str]]:
    """(trainable, frozen) metadata trees of a pytree item and the keys leading to them."""
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
    except Exception as e:  # orbax raises many kinds; all mean "not a readable checkpoint"
        raise EvalError(f"--checkpoint: cannot read {item}: {type(e).__name__}: {e}") from e
    node, keys = getattr(meta, "tree", meta), []
    for wrapper in ("state", "train_state", "params"):  # tolerate one level of nesting
        if isinstance(node, dict) and "trainable" not in node and wrapper in node:
            node, keys = node[wrapper], keys + [wrapper]
    if not (isinstance(node, dict) and "trainable" in node and "frozen" in node):
        raise EvalError(f"--checkpoint: {item} holds no 'trainable'/'frozen' params")
    return node["trainable"], node["frozen"], keys


def _expected_shapes(cfg) -> tuple[dict, dict]:
    """{"['path']...": shape} of the trainable and frozen params a config gives (traced, not built)."""
    import flax.linen as nn
    import jax

    from vlacabin_jax.model import functional

    want = jax.eval_shape(lambda: functional.init_params(cfg, jax.random.key(0)))
    return tuple({jax.tree_util.keystr(k): tuple(v.shape)
                  for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(w))} for w in want)


def _check_shapes(trainable, frozen, cfg) -> None:
    """EvalError unless the param trees (arrays or Orbax metadata) have the shapes `cfg` gives."""
    import jax

    is_leaf = lambda x: hasattr(x, "shape")  # noqa: E731  (Orbax metadata leaves too)
    for name, got, ref in zip(("trainable", "frozen"), (trainable, frozen), _expected_shapes(cfg)):
        g = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(got, is_leaf)}
        if g != ref:
            diff = sorted(set(g.items()) ^ set(ref.items()))[:3]
            raise EvalError(f"--checkpoint: {name} params do not match config {cfg.variant!r} "
                            f"(first differences: {diff}); pass the config the checkpoint was trained with")


def restore_params(path: str, cfg, step: int | None = None):
    """(trainable, frozen) of an Orbax checkpoint as numpy, params only (the optimizer state is
    never read): an Orbax partial restore of the `trainable` / `frozen` subtrees of the state item.

    Shapes are checked against `cfg` from the checkpoint's metadata before anything is read.
    Files that fail the trainer's checksums (`vlacabin_jax.train.checkpoint`) are refused.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    from vlacabin_jax.train.checkpoint import checksum_problem

    item = find_checkpoint_item(path, step)
    problem = checksum_problem(item.parent)  # the step directory, when the trainer wrote checksums
    if problem is not None:
        raise EvalError(f"--checkpoint: {item.parent} is damaged ({problem}); evaluate another step with --step")
    meta_t, meta_f, keys = _params_metadata(item)
    _check_shapes(meta_t, meta_f, cfg)
    want = {"trainable": meta_t, "frozen": meta_f}
    for key in reversed(keys):  # rebuild the path from the item's root, for the partial restore
        want = {key: want}
    args = ocp.args.PyTreeRestore(item=want, partial_restore=True, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want))
    out = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(epath.Path(item), args=args)
    for key in keys:
        out = out[key]
    return out["trainable"], out["frozen"]


def resolve_config(entry: str, args, overrides: list[str]):
    """The config of one evaluated entry: a checkpoint's saved config (unless --config is given
    explicitly), else --config; `--config.*` overrides apply last."""
    if entry not in SPECIAL and args.config is None:
        saved = checkpoint_config(find_checkpoint_item(entry, args.step))
        if saved is not None:
            return load_config(f"{CONFIG_FILE}:{saved['variant']}",
                               _as_overrides(saved) + overrides)
    return load_config(args.config or DEFAULT_CONFIG, overrides)


# ---------------------------------------------------------------- one evaluation
def evaluate_one(entry: str, args, cfg, samples, retrieval_samples) -> dict:
    """Results of one entry: "oracle", "random", "random-init" or a checkpoint directory."""
    from vlacabin_jax.eval import evaluate as E

    t0 = time.perf_counter()
    if entry in ("oracle", "random"):
        fn = E.oracle_policy(cfg) if entry == "oracle" else E.random_policy(cfg, seed=args.seed)
        res = E.evaluate_policy(fn, samples, cfg, num_failures=args.failures)
    else:
        if entry == "random-init":
            trainable, frozen = E.random_init(cfg, args.seed)
        else:
            trainable, frozen = restore_params(entry, cfg, args.step)
        res = E.evaluate_model(trainable, frozen, cfg, samples, steps=args.steps, batch_size=args.batch_size,
                               retrieval_samples=retrieval_samples, retrieval_pool=args.retrieval_samples,
                               num_failures=args.failures)
        if args.latency_iters > 0:
            res["latency"] = E.latency(trainable, frozen, cfg, samples, (1, args.batch_size),
                                       iters=args.latency_iters, steps=args.steps)
    res["meta"] = {"policy": entry, "variant": cfg.variant, "split": args.split, "num_samples": len(samples),
                   "steps": args.steps or int(cfg.model.dnfm.sample_steps),
                   "seconds": round(time.perf_counter() - t0, 2)}
    return res


def default_out(entries: list[str], names: list[str]) -> Path:
    """`<run>/eval` for a run's `checkpoints/` directory, else `runs/eval/<names>` (runs/ is ignored by git)."""
    if len(entries) == 1 and entries[0] not in SPECIAL and Path(entries[0]).resolve().name == "checkpoints":
        return Path(entries[0]).resolve().parent / "eval"
    return Path("runs", "eval", "_vs_".join(names))


def _name(entry: str) -> str:
    """A short label: the run's name for `<run>/checkpoints`, else the directory's own name."""
    if entry in SPECIAL:
        return entry
    p = Path(entry).resolve()
    return p.parent.name if p.name == "checkpoints" else p.name


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
    for e in entries:
        if e not in SPECIAL and not Path(e).is_dir():
            print(f"error: checkpoint {e}: no such directory", file=sys.stderr)
            return 2

    from vlacabin_jax.data import pipeline
    from vlacabin_jax.eval import evaluate as E
    from vlacabin_jax.eval import report

    cache: dict[str, tuple[list, list]] = {}  # eval sets per generator parameters (shared by entries)
    results = []
    try:
        for e in entries:
            cfg = resolve_config(e, args, overrides)
            key = json.dumps(pipeline.synthetic_params(cfg), sort_keys=True)
            if key not in cache:
                cache[key] = (E.eval_samples(cfg, args.num_samples, "vla", args.split), [])
            samples, extra = cache[key]
            if e not in ("oracle", "random") and args.retrieval_samples and not extra:
                for kind in ("video_text", "speech_text"):
                    extra += E.eval_samples(cfg, args.retrieval_samples, kind, args.split)
            results.append(evaluate_one(e, args, cfg, samples, extra))
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    names = [_name(e) for e in entries]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"A-{names[0]}", f"B-{names[1]}"]
    out = Path(args.out) if args.out else default_out(entries, names)
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
