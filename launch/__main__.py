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
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/vla_cabin.py:tiny; override fields with "
    "--config.<section>.<field>=value.", lock_config=True)
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


def _one_line(text) -> str:
    """A message on one line; an embedded traceback (config file errors) shrinks to its last line."""
    lines = [line.strip() for line in str(text).replace("\\n", "\n").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            head = " ".join(lines[:i] + [line.split("Traceback (most recent call last)")[0]]).strip()
            return f"{head} {lines[-1]}".strip()
    return " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with config-file and override problems turned into one `error:` line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_one_line(e))
    except (KeyError, AttributeError) as e:  # an override names a field the config does not have
        text = _one_line(e.args[0] if e.args else e)
        hint = text[text.find("Did you mean"):].strip("'\" ") + " " if "Did you mean" in text else ""
        overrides = [a for a in argv if a.startswith("--config.")]
        fail(f"unknown config field in {' '.join(overrides)}: {hint}(fields are listed in "
             f"configs/vla_cabin.py)")
    except (ValueError, TypeError, OSError, ImportError, SyntaxError) as e:
        fail(f"could not load --config: {type(e).__name__}: {_one_line(e)}")
    return []  # unreachable


def multiprocess_environment(coordinator: str | None, env=os.environ) -> str | None:
    """Why this looks like one process of several (None: a single-process run)."""
    if coordinator:
        return "--coordinator_address"
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return "SLURM"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU"
    return None


def _initialize_distributed() -> None:
    import jax

    reason = multiprocess_environment(_COORDINATOR.value)
    if reason is None:
        return
    if reason == "--coordinator_address":
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            fail("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   heartbeat_timeout_seconds=_HEARTBEAT.value)
    else:  # SLURM and TPU pods are detected by JAX itself
        jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)
    logging.info("jax.distributed initialised (%s): process %d of %d", reason, jax.process_index(),
                 jax.process_count())


def _enable_compilation_cache(workdir: str) -> None:
    import jax

    path = _CACHE.value or os.environ.get("VLACABIN_JAX_CACHE") or os.path.join(workdir, "jax_cache")
    if path.lower() == "none":
        return
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; config fields are set as --config.<section>.<field>=value")
    if _CONFIG.value is None:
        fail("--config is required, e.g. --config configs/vla_cabin.py:tiny")
    if not _WORKDIR.value:
        fail("--workdir is required, e.g. --workdir runs/demo")
    logging.set_verbosity(logging.WARNING)
    # Before the first JAX import: XLA reads these flags once (see vlacabin_jax/xla_cpu.py).
    from vlacabin_jax.xla_cpu import with_cpu_flags

    os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""))

    # Imported here so that `--help` and flag errors stay fast.
    from vlacabin_jax.config import ConfigError, validate
    from vlacabin_jax.hf_import import HFImportError
    from vlacabin_jax.sharding import MeshError
    from vlacabin_jax.train import loop
    from vlacabin_jax.train.checkpoint import CheckpointError, SaveError

    cfg = _CONFIG.value
    try:  # config_flags reports a config file that failed to load on first use
        cfg.get("variant")
    except (OSError, ImportError, SyntaxError, AttributeError, KeyError) as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(f"could not load --config {flags.FLAGS['config'].serialize().split('=', 1)[-1]}: "
             f"{detail[-1] if detail else type(e).__name__}")
    try:
        validate(cfg)  # before any JAX work: a bad config fails in a second
        if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
            raise loop.WorkdirError(f"--workdir {_WORKDIR.value} exists and is not a directory; pass a "
                                    f"directory path")
        _initialize_distributed()  # before anything initialises a JAX backend
        _enable_compilation_cache(_WORKDIR.value)
        summary = loop.train(cfg, _WORKDIR.value, stop=loop.StopFlag(at_step=_STOP_AT.value))
    except (ConfigError, MeshError, loop.WorkdirError, CheckpointError, HFImportError) as e:
        fail(str(e))
    except (loop.TrainingError, SaveError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    status = (f"stopped ({summary.stop_reason}), checkpoint saved" if summary.preempted else "done")
    ev = f", eval loss {summary.eval['loss']:.4f}" if summary.eval.get("loss") is not None else ""
    first = f"{summary.first_loss:.4f}" if summary.first_loss is not None else "-"
    last = f"{summary.last_loss:.4f}" if summary.last_loss is not None else "-"
    print(f"{status}: step {summary.step}, loss {first} -> {last}{ev}; workdir {os.path.abspath(_WORKDIR.value)}",
          flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
