"""`python -m launch.local --processes 2 --devices 4 -- --config configs/vla_cabin.py:tiny --workdir runs/mp`

Runs N JAX processes of `python -m launch` on this machine, each with its own simulated CPU devices,
joined by `jax.distributed` on 127.0.0.1 with gloo collectives: the multi-host code paths
(per-process data slices, global arrays from process-local rows, one checkpoint written by all
processes together, preemption agreement) exercised without a cluster.

Everything after `--` goes to every process unchanged. Output lines are prefixed with `[p<i>]`.
SIGTERM/SIGINT are forwarded to every process (each saves and exits 0). The exit status is the
first non-zero one of the processes (0 when all succeed); if one process fails, the others are
terminated rather than left waiting on collectives.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, base: dict | None = None) -> dict:
    """The environment of one local process: CPU backend, `devices` simulated devices, gloo."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def commands(processes: int, port: int, launch_args: list[str]) -> list[list[str]]:
    """One `python -m launch` command line per process."""
    return [[sys.executable, "-m", "launch", *launch_args, f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={processes}", f"--process_id={i}"] for i in range(processes)]


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{index}] {line}")
        out.flush()


def run(processes: int, devices: int, launch_args: list[str], grace_s: float = 60.0) -> int:
    """Starts the processes, relays their output and signals; returns the exit status."""
    port = free_port()
    env = process_env(devices)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) for cmd in commands(processes, port, launch_args)]
    pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(sig, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and not status:
                status = failed[0]
                # A dead peer leaves the others blocked in collectives: stop them.
                deadline = time.monotonic() + grace_s
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
        for t in pumps:
            t.join(timeout=5)
        return status or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, launch_args = argv[:split], argv[split + 1:]
    else:
        own, launch_args = argv, []
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[1])
    parser.add_argument("--processes", type=int, default=2, help="JAX processes (default 2)")
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process (default 4)")
    args = parser.parse_args(own)
    if args.processes < 1 or args.devices < 1:
        parser.error("--processes and --devices must be >= 1")
    if not any(a.startswith("--config") for a in launch_args) or not any(a.startswith("--workdir") for a in launch_args):
        parser.error("give the trainer's flags after --, e.g. -- --config configs/vla_cabin.py:tiny --workdir runs/mp")
    return run(args.processes, args.devices, launch_args)


if __name__ == "__main__":
    sys.exit(main())
