#!/usr/bin/env bash
# The device check (docs/performance.md): on a host with one NVIDIA GPU, measures `base` in under
# 8 minutes -- MFU with remat none / dots / full, cuDNN attention on / off, JAX vs PyTorch
# (eager, torch.compile) on the same batch, decision latency at K = 1, 2, 4, 8 against the
# autoregressive head, and the measured peak memory against XLA's estimate -- and writes
# runs/device_check/device_check.json plus a table. Extra flags go through, e.g.
#   bash tools/device_check.sh --config configs/vla_cabin.py:small --global-batch 64 --budget 300
# The logic is vlacabin_jax/perf/bench/device_check.py (`--help` there).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m vlacabin_jax.perf.bench.device_check --config configs/vla_cabin.py:base --out runs/device_check "$@"
