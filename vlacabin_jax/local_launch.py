"""N local JAX processes of `python -m launch`, joined by `jax.distributed` on 127.0.0.1 with gloo.

    run(processes, devices, launch_args) -> exit status    (the command line: `python -m launch.local`)

Each process gets its own simulated CPU devices (`process_env`) and its id (`commands`). Output lines
are relayed with a `[p<i>]` prefix; SIGTERM/SIGINT are forwarded to every process. If one fails,
the others are killed at once (they can only wait on collectives without it) and `failure_line`
names the process and the cause.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from vlacabin_jax.xla_cpu import with_cpu_flags


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


class Output:
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


def failure_line(index: int, code: int, output: Output) -> str:
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
    output = Output(sys.stdout)
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
