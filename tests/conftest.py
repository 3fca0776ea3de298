"""Every test sees 8 simulated CPU devices; set before JAX is imported anywhere.

Compiled programs go to one persistent cache per test session (`VLACABIN_JAX_CACHE`, default
`.pytest_cache/jax`), so tests and the subprocesses they start compile each program once.
"""
import os
import pathlib

from vlacabin_jax.xla_cpu import with_cpu_flags  # imports no JAX, so the flags still count

os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""), devices=8)
# The suite compiles ~100 programs and runs most a few steps: LLVM at -O0 compiles tiny's train
# step in 21 s instead of 37 s for a 1.5x slower step (HLO passes, hence numerics, unchanged).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "VLACABIN_JAX_CACHE", str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_compilation_cache_dir", os.environ["VLACABIN_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
