"""Waiting for every process of a multi-process run at a named point.

    wait_for_all_processes(name, timeout_s) -> None

Through JAX's coordination service (a key-value RPC), not a device collective: processes may
arrive minutes apart — one compiling a step while another loaded it from its compilation cache
(the cache is written by process 0 only, and other processes' keys differ) — without tripping
the collectives' own short set-up timeouts (gloo gives up after 30 s).
"""

from __future__ import annotations

import jax


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
    """Returns once every process has called this with the same `name` (no-op for one process).

    Args:
      name: the barrier's id; use each id once per run (add a step or counter).
      timeout_s: how long to wait for the slowest process before raising.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client Orbax and multihost_utils use as well

    distributed.global_state.client.wait_at_barrier(f"vlacabin:{name}", int(timeout_s * 1000))
