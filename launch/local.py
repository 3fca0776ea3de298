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
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from vlacabin_jax.xla_cpu import with_cpu_flags

OWN_FLAGS = ("--processes", "--devices")  # the launcher's; every other flag is the trainer's


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, base: dict | None = None) -> dict:
    """The environment of one local process: CPU backend, `devices` simulated devices, gloo."""
    env = dict(os.environ if base is None else base)
    env["XLA_FLAGS"] = with_cpu_flags(env.get("XLA_FLAGS", ""), devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def commands(processes: int, port: int, launch_args: list[str]) -> list[list[str]]:
    """One `python -m launch` command line per process."""
    return [[sys.executable, "-m", "launch", *launch_args, f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={processes}", f"--process_id={i}"] for i in range(processes)]


class _Output:
    """Relays the processes' lines with a `[p<i>]` prefix and remembers why the run failed."""

    def __init__(self, out):
        self.out, self.lock = out, threading.Lock()
        self.unhealthy: list[str] = []  # the coordination service's list of silent processes
        self.errors: dict[int, str] = {}  # each process's last `error: ...` line

    def pump(self, index: int, stream) -> None:
        expect_ids = False
        for line in iter(stream.readline, ""):
            with self.lock:
                self.out.write(f"[p{index}] {line}")
                self.out.flush()
            if expect_ids and line.strip().replace(",", " ").replace(" ", "").isdigit():
                self.unhealthy = line.strip().replace(",", " ").split()
            expect_ids = "stopped sending heartbeats" in line
            if line.startswith("error: "):
                self.errors[index] = line.strip()


def describe(code: int) -> str:
    """An exit status in words ("exit status 1", "signal SIGKILL")."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def failure_line(index: int, code: int, output: _Output) -> str:
    """The one line that says why a multi-process run stopped; `index` failed first with `code`."""
    if index in output.errors:
        return f"{output.errors[index]} (process {index})"
    # Once the coordination service has named silent peers, a survivor that then dies by a signal
    # was taken down by it: SIGABRT usually, SIGSEGV when the abort races gloo's threads.
    if code < 0 and output.unhealthy and str(index) not in output.unhealthy:
        return (f"error: process {', '.join(output.unhealthy)} stopped sending heartbeats (hung, frozen or cut "
                f"off), so the coordination service stopped the run; restart it to resume from the newest "
                f"checkpoint")
    return (f"error: process {index} died ({describe(code)}); the others were stopped; restart the run to "
            f"resume from the newest complete checkpoint")


def run(processes: int, devices: int, launch_args: list[str]) -> int:
    """Starts the processes, relays their output and signals; returns the exit status."""
    port = free_port()
    env = process_env(devices)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) for cmd in commands(processes, port, launch_args)]
    output = _Output(sys.stdout)
    pumps = [threading.Thread(target=output.pump, args=(i, p.stdout), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(sig, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_failed = None
        while True:
            running = [p.poll() is None for p in procs]  # every process polled, every time
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed and first_failed is None:
                # A peer's death makes the coordination service abort the others (SIGABRT) within
                # moments: among processes found dead together, the cause is one that was not aborted.
                first_failed = min(failed, key=lambda i: procs[i].returncode == -signal.SIGABRT)
                for p in procs:  # SIGKILL also ends a stopped (hung) process
                    if p.poll() is None:
                        p.kill()
            if not any(running):
                break
            time.sleep(0.1)
        for t in pumps:
            t.join(timeout=5)
        if first_failed is None:
            return 0
        print(failure_line(first_failed, procs[first_failed].returncode, output), file=sys.stderr, flush=True)
        return procs[first_failed].returncode if procs[first_failed].returncode > 0 else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
