"""`python -m launch.local --processes 2 --devices 4 --config configs/vla_cabin.py:tiny --workdir runs/mp`

Runs N JAX processes of `python -m launch` on this machine, each with its own simulated CPU devices,
joined by `jax.distributed` on 127.0.0.1 with gloo collectives: the multi-host code paths
(per-process data slices, global arrays from process-local rows, one checkpoint written by all
processes together, preemption agreement) exercised without a cluster.

`--processes` and `--devices` are the launcher's; every other flag goes to every process unchanged,
as does everything after an optional `--` (for a trainer flag that the launcher would take). Output lines are prefixed with `[p<i>]`.
SIGTERM/SIGINT are forwarded to every process (each saves and exits 0). The exit status is the
first non-zero one of the processes (0 when all succeed). If one process fails, the others are
killed at once: they cannot finish a step or a checkpoint without it, only wait on collectives.
The last line then names the process and the cause, e.g. a peer that stopped sending heartbeats
(hung or frozen: JAX's coordination service stops the run after `--heartbeat_timeout_s`).
"""

from __future__ import annotations

import argparse
import sys

from vlacabin_jax.local_launch import run

OWN_FLAGS = ("--processes", "--devices")  # the launcher's; every other flag is the trainer's


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own flags, the trainer's flags) of a command line.

    Before an optional `--`, `--processes`/`--devices` (with their values) and `-h` are the
    launcher's and every other argument passes through in order; after it, everything does.
    """
    split = argv.index("--") if "--" in argv else len(argv)
    before, after = argv[:split], argv[split + 1:]
    own, trainer, i = [], [], 0
    while i < len(before):
        arg = before[i]
        if arg.split("=", 1)[0] in OWN_FLAGS:
            takes_next = "=" not in arg and i + 1 < len(before)
            own += before[i:i + 1 + takes_next]
            i += 1 + takes_next
            continue
        (own if arg in ("-h", "--help") else trainer).append(arg)
        i += 1
    return own, trainer + after


def main(argv: list[str] | None = None) -> int:
    own, launch_args = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[1])
    parser.add_argument("--processes", type=int, default=2, help="JAX processes (default 2)")
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process (default 4)")
    args = parser.parse_args(own)
    if args.processes < 1 or args.devices < 1:
        parser.error("--processes and --devices must be >= 1")
    if not any(a.startswith("--config") for a in launch_args) or not any(a.startswith("--workdir") for a in launch_args):
        parser.error("give the trainer's flags, e.g. --config configs/vla_cabin.py:tiny --workdir runs/mp "
                     "(optionally after --)")
    return run(args.processes, args.devices, launch_args)


if __name__ == "__main__":
    sys.exit(main())
