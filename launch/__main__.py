"""`python -m launch --config configs/vla_cabin.py:tiny --workdir runs/demo [--config.optim.lr=3e-4 ...]`

Trains (or resumes, when `--workdir` has checkpoints) the config. Stage configs work the same way:
`--config configs/stages/sft.py:tiny`. Multi-process runs call `jax.distributed.initialize()` when
SLURM (more than one task), a multi-host TPU slice, or `--coordinator_address` is detected.

Compiled programs are cached in `<workdir>/jax_cache` (or `--jax_cache_dir`, or the
`VLACABIN_JAX_CACHE` environment variable), so a restart does not compile again.

Exit codes: 0 done or preempted-and-saved (SIGTERM), 2 unusable input (config, mesh, workdir,
checkpoint) with one `error: ...` line on stderr, 1 training failure (non-finite losses, a checkpoint
that could not be written) with one `error: ...` line.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

_CONFIG = flags.DEFINE_string("config", None, "Config file and variant, e.g. configs/vla_cabin.py:tiny; override "
                              "fields with --config.<section>.<field>=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/, metrics.jsonl, tb/); "
                               "an existing one is resumed.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                                   "without SLURM/TPU auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "Stop (checkpoint, exit 0) once this step is reached: "
                                "runs part of a schedule without changing the config (benchmarks, tests).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process runs: a process that sends no "
                                  "heartbeat for this long counts as dead and the run stops with an error "
                                  "(JAX's coordination service; a hung peer would otherwise block collectives).")
_CACHE = flags.DEFINE_string("jax_cache_dir", None, "Persistent compilation cache; default "
                             "$VLACABIN_JAX_CACHE or <workdir>/jax_cache; 'none' disables it.")

USAGE_ERROR = 2


def fail(message: str) -> None:
    """One line on stderr, exit code 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing of the launcher's flags; `--config.a.b=value` overrides (also `--config.a.b
    value`) are kept apart for `load_config` and returned after the remaining arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and "=" not in arg and i + 1 < len(argv):
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        (overrides if arg.startswith("--config.") else rest).append(arg)
        i += 1
    try:
        return flags.FLAGS(rest) + overrides
    except flags.Error as e:
        fail(" ".join(str(e).split()))
    return []  # unreachable


def main(argv: list[str]) -> None:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    if len(argv) - 1 > len(overrides):
        fail(f"unexpected arguments {[a for a in argv[1:] if a not in overrides]}; config fields are set as "
             f"--config.<section>.<field>=value")
    if _CONFIG.value is None:
        fail("--config is required, e.g. --config configs/vla_cabin.py:tiny")
    if not _WORKDIR.value:
        fail("--workdir is required, e.g. --workdir runs/demo")
    logging.set_verbosity(logging.WARNING)
    # Before the first JAX import: XLA reads these flags once (see vlacabin_jax/xla_cpu.py).
    from vlacabin_jax.xla_cpu import with_cpu_flags

    os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""))

    # Imported here so that `--help` and flag errors stay fast.
    from vlacabin_jax import runtime
    from vlacabin_jax.config import ConfigError, load_config
    from vlacabin_jax.hf_import import HFImportError
    from vlacabin_jax.sharding import MeshError
    from vlacabin_jax.train import loop
    from vlacabin_jax.train.checkpoint import CheckpointError, SaveError

    workdir = _WORKDIR.value
    try:
        cfg = load_config(_CONFIG.value, overrides)  # validated: a bad config fails before any JAX work
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise loop.WorkdirError(f"--workdir {workdir} exists and is not a directory; pass a directory path")
        # Before anything initialises a JAX backend.
        runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
        runtime.enable_compilation_cache(_CACHE.value or os.environ.get("VLACABIN_JAX_CACHE")
                                         or os.path.join(workdir, "jax_cache"))
        summary = loop.train(cfg, workdir, stop=loop.StopFlag(at_step=_STOP_AT.value))
    except (ConfigError, MeshError, loop.WorkdirError, CheckpointError, HFImportError,
            runtime.RuntimeSetupError) as e:
        fail(str(e))
    except (loop.TrainingError, SaveError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    status = (f"stopped ({summary.stop_reason}), checkpoint saved" if summary.preempted else "done")
    ev = f", eval loss {summary.eval['loss']:.4f}" if summary.eval.get("loss") is not None else ""
    first = f"{summary.first_loss:.4f}" if summary.first_loss is not None else "-"
    last = f"{summary.last_loss:.4f}" if summary.last_loss is not None else "-"
    print(f"{status}: step {summary.step}, loss {first} -> {last}{ev}; workdir {os.path.abspath(workdir)}",
          flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
