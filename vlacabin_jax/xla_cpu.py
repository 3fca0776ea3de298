"""XLA:CPU flags that must be in `XLA_FLAGS` before a JAX backend starts (XLA reads them once).

    with_cpu_flags(xla_flags, devices=None) -> the XLA_FLAGS string to set

XLA:CPU's concurrency-optimised schedule lets one device start several independent collectives
at once, and with more (simulated) devices than cores the devices can then wait on each other
forever (seen: `small` on the 2x2x2 mesh on 2 cores deadlocked in 7 of 7 attempts). The memory-
optimised schedule runs those meshes. Only the environment flag takes effect: the same option in
`jax.jit(compiler_options=...)` leaves the compiled program unchanged in JAX 0.10.
Other backends ignore these flags.
"""

from __future__ import annotations

MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def with_cpu_flags(xla_flags: str, devices: int | None = None) -> str:
    """`xla_flags` plus the memory-optimised CPU schedule, unless it already sets the scheduler.

    Args:
      xla_flags: the current XLA_FLAGS value ("" when unset).
      devices: simulated CPU devices (replaces any device count in `xla_flags`); None keeps it.
    """
    flags = xla_flags.split()
    if devices is not None:
        flags = [f for f in flags if not f.startswith(_DEVICE_COUNT)] + [f"{_DEVICE_COUNT}={devices}"]
    if not any(f.startswith(MEMORY_SCHEDULER.split("=")[0]) for f in flags):
        flags.append(MEMORY_SCHEDULER)
    return " ".join(flags)
