"""Low-rank adapters (LoRA) on the modality encoders' dense layers, and their merge for export.

    LoRA.from_config(model_cfg)   -> the adapter settings of `model.lora` (rank, alpha, targets)
    merge(params, scale)          -> params with every adapter folded into its base kernel, adapters gone
    is_adapter(path)              -> whether a param path names an adapter matrix

An adapted `layers.Dense` computes `x W + scale · (x A) B` with `A [in..., rank]`,
`B [rank, out...]` and `scale = alpha / rank`; `B` starts at zero, so a model with adapters starts
with exactly the outputs of the same model without them. The adapters are params `lora_a` and
`lora_b` beside the Dense's `dense/{kernel,bias}`; `merge` turns them into `W + scale · A @ B`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

# Param names of the adapter matrices (distinct from every base param name, so a checkpoint of a
# model without adapters restores into one with them and lists exactly these as new).
ADAPTER_NAMES = ("lora_a", "lora_b")

# Which Dense layers of the modality encoders may get adapters, by the Dense's own name:
# attention projections, MLP matrices, the text/video input projections, the Gaussian heads.
TARGETS = ("query", "key", "value", "out", "up", "down", "proj", "mean", "logvar")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapter settings threaded through the encoder modules (hashable: a Flax module attribute).

    rank: adapter rank (0: no adapters). alpha: the update is scaled by alpha / rank.
    targets: names of the Dense layers (see `TARGETS`) that get adapters.
    """

    rank: int = 0
    alpha: float = 1.0
    targets: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, model_cfg: Any) -> "LoRA":
        """From the `model` config section (`model.lora.{rank, alpha, targets}`); a config saved
        before LoRA existed has no `lora` section and means no adapters."""
        c = model_cfg.get("lora")
        if c is None:
            return cls()
        return cls(int(c["rank"]), float(c["alpha"]), parse_targets(c["targets"]))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def dense(self, name: str) -> dict:
        """Keyword arguments of `layers.Dense` for the Dense called `name`: adapters when targeted."""
        if self.rank and name in self.targets:
            return {"lora_rank": self.rank, "lora_scale": self.scale}
        return {}


def parse_targets(targets: str) -> tuple[str, ...]:
    """"query,value, up" → ("query", "value", "up") (order kept, blanks dropped)."""
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def is_adapter(path: tuple[str, ...]) -> bool:
    """True for the path (tuple of dict keys) of an adapter matrix."""
    return bool(path) and path[-1] in ADAPTER_NAMES


def _fold(kernel: Any, a: Any, b: Any, scale: float) -> Any:
    """kernel + scale · A @ B, contracting A's last axis with B's first.

    Shapes: kernel [*lead, *in, *out], a [*lead, *in, r], b [*lead, r, *out]; `lead` holds the
    `layers` axis of a scanned stack (empty otherwise). Computed in float32, returned in the
    kernel's dtype.
    """
    n_lead = a.ndim + b.ndim - 2 - kernel.ndim
    lead = kernel.shape[:n_lead]
    n_in = a.ndim - n_lead - 1
    in_shape, out_shape = kernel.shape[n_lead:n_lead + n_in], kernel.shape[n_lead + n_in:]
    a2 = jnp.reshape(jnp.asarray(a, jnp.float32), lead + (-1, a.shape[-1]))
    b2 = jnp.reshape(jnp.asarray(b, jnp.float32), lead + (b.shape[n_lead], -1))
    delta = jnp.reshape(jnp.matmul(a2, b2), lead + in_shape + out_shape)
    return (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(params: Mapping[str, Any], scale: float) -> dict:
    """Fold every adapter into its base kernel: W' = W + scale · A @ B; drop `lora_a`/`lora_b`.

    Args:
      params: the full unboxed param tree (`functional.merge_params(trainable, frozen)`: an
        adapter and its base kernel may sit in different groups), nested dicts of arrays; scanned
        stacks (leading `layers` axis) included.
      scale: `alpha / rank` of the config the adapters were trained with.
    Returns:
      the same tree without adapter params; a model built with `model.lora.rank = 0` runs it and
      gives the outputs of the adapted model.
    """
    out = {}
    for key, value in params.items():
        out[key] = merge(value, scale) if isinstance(value, Mapping) else value
    if "lora_a" in out and "lora_b" in out:
        dense = dict(out["dense"])
        dense["kernel"] = _fold(dense["kernel"], out.pop("lora_a"), out.pop("lora_b"), scale)
        out["dense"] = dense
    return out
