"""The XLA:CPU flags every entry point sets before JAX starts."""

import os

from vlacabin_jax.local_launch import process_env
from vlacabin_jax.perf.bench.common import worker_env
from vlacabin_jax.xla_cpu import MEMORY_SCHEDULER, with_cpu_flags


def test_flags_add_the_memory_scheduler_once_and_replace_the_device_count():
    flags = with_cpu_flags("--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x", devices=2).split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=2", MEMORY_SCHEDULER]
    assert with_cpu_flags(" ".join(flags)).split() == flags  # idempotent
    assert with_cpu_flags("").split() == [MEMORY_SCHEDULER]
    # A user who asks for the concurrency-optimised schedule keeps it.
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert with_cpu_flags(mine, devices=4).split() == [mine, "--xla_force_host_platform_device_count=4"]


def test_the_tests_local_processes_and_bench_workers_all_run_with_it():
    assert MEMORY_SCHEDULER in os.environ["XLA_FLAGS"].split()  # tests/conftest.py
    for env in (process_env(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
                worker_env(4, "/tmp/cache")):
        flags = env["XLA_FLAGS"].split()
        assert MEMORY_SCHEDULER in flags and "--xla_force_host_platform_device_count=4" in flags
        assert "--xla_force_host_platform_device_count=8" not in flags
