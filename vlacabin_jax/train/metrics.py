"""Run metrics: JSONL + TensorBoard in the workdir, a console progress bar, MFU and device memory.

    MetricsWriter(workdir, total_steps, start_step)
      .write(step, scalars)   -> one JSON object per logged step in <workdir>/metrics.jsonl,
                                 the same scalars under <workdir>/tb/, a console line
      .event(step, text)      -> a console line + a row in <workdir>/events.jsonl (resume, rollback,
                                 preemption, checkpoint saves)
      .advance(n)             -> moves the progress bar (host only; no device sync)
    peak_flops_per_device(device) -> bf16 dense peak FLOP/s of a known accelerator, else None
    mfu(flops_per_sample, samples_per_s, devices) -> model FLOPs utilisation in [0, 1], or None
    memory_stats(devices)     -> {"memory_gib", "peak_memory_gib", "memory_limit_gib"} when reported

Only process 0 writes files and draws the bar.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax

# bf16 dense peak FLOP/s per JAX device, by a substring of `device.device_kind` (first match wins,
# so the more specific names come first). TPU v2/v3 expose each TensorCore as a device (half a
# chip); v4 and later expose a chip.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),  # Trillium (v6e)
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),
    ("TPU v2", 22.5e12),
)

_GIB = float(1 << 30)


def peak_flops_per_device(device: jax.Device) -> float | None:
    """bf16 dense peak FLOP/s of `device`, or None (CPU, unknown accelerator)."""
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_FLOPS if name.lower() in kind.lower()), None)


def mfu(flops_per_sample: float, samples_per_s: float, devices: Sequence[jax.Device]) -> float | None:
    """Achieved model FLOP/s over the peak of all `devices` (None where the peak is unknown)."""
    peak = peak_flops_per_device(devices[0]) if devices else None
    if not peak:
        return None
    return flops_per_sample * samples_per_s / (peak * len(devices))


def memory_stats(devices: Sequence[jax.Device]) -> dict[str, float]:
    """Largest in-use / peak / limit over this process's devices, in GiB; {} if not reported."""
    stats = []
    for d in devices:
        try:
            s = d.memory_stats()
        except (RuntimeError, NotImplementedError, AttributeError):
            s = None
        if s:
            stats.append(s)
    if not stats:
        return {}
    out = {}
    for key, name in (("bytes_in_use", "memory_gib"), ("peak_bytes_in_use", "peak_memory_gib"),
                      ("bytes_limit", "memory_limit_gib")):
        values = [s[key] for s in stats if key in s]
        if values:
            out[name] = max(values) / _GIB
    return out


def _plain(value) -> float | int | str | None:
    if isinstance(value, (int, str)) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # JSON has no NaN; keep it readable


class MetricsWriter:
    """Writes logged steps to `<workdir>/metrics.jsonl` and `<workdir>/tb/`, and draws the bar.

    Rows are appended: a resumed or rolled-back run writes some steps again; the last row of a
    step is the one that counts.
    """

    def __init__(self, workdir: str | Path, total_steps: int, start_step: int = 0, *,
                 enabled: bool | None = None, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._events = self._tb = self._bar = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        self._events = open(workdir / "events.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tb"), flush_secs=30)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def reset_position(self, step: int) -> None:
        """After a rollback the bar goes back to `step`."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def write(self, step: int, scalars: dict[str, float], console_keys: Sequence[str] = ()) -> None:
        """One row `{"step": step, **scalars}`; scalars named "eval/..." go to the eval TB group."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self._tb.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
        if self._bar is not None and "loss" in scalars:
            self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        shown = [f"{k}={scalars[k]:.4g}" for k in console_keys if isinstance(scalars.get(k), (int, float))]
        self._print(f"step {step}: " + " ".join(shown))

    def event(self, step: int, text: str, **fields) -> None:
        """A notable event (rollback, preemption, resume): console line and an events.jsonl row."""
        if not self.enabled:
            return
        self._events.write(json.dumps({"step": int(step), "event": text, **fields}) + "\n")
        self._print(f"step {step}: {text}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()
        self._events.close()
