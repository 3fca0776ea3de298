"""The least collective traffic a sharding of the train step needs, from the config alone.

    param_table(cfg)                  -> [ParamShard]: every param with its mesh-axis spec per dim
    sharded_axes(param, mesh_shape)   -> the mesh axes (of size > 1) that shard a param
    minimum_bytes(cfg, mesh_shape)    -> {(kind, axes): bytes per step}, the convention of `hlo.py`
    activation_tokens(cfg)            -> [(stack, tokens per sample, width, depth, passes)]

The model (per device, per step; ZeRO-3 / Megatron style, nothing sent twice):
- fsdp: every param sharded over `fsdp` is all-gathered once, in the compute dtype (`model.dtype`)
  when that is narrower than its storage; each trainable one's gradient is reduce-scattered once
  in fp32 (`model.param_dtype`).
- data (and fsdp for params it does not shard): the trainable gradients are all-reduced once over
  the batch axes they are replicated on.
- tensor: Megatron's activation all-reduces, one after attention and one after the MLP of every
  block per forward pass and as many again backward where gradients flow (the frozen LM included:
  its input gets gradients; the frozen ViT runs forward only); cross-attention adds one.
  Embedding / logit collectives over a vocab-sharded table are not counted.
Remat does not change this minimum (the gathered params can be kept for the recompute).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from vlacabin_jax import sharding
from vlacabin_jax.data.spec import MODALITIES
from vlacabin_jax.model import functional


@dataclasses.dataclass(frozen=True)
class ParamShard:
    """One param: path, shape, storage bytes (full), trainable, and per dim the mesh axes the
    logical-axis rules map it to (before checking that they divide the dim)."""

    path: str
    shape: tuple[int, ...]
    nbytes: int
    trainable: bool
    spec: tuple[tuple[str, ...], ...]


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def param_table(cfg: ml_collections.ConfigDict) -> list[ParamShard]:
    """Every param of `cfg` with its mesh-axis spec (shapes only; no allocation)."""
    boxed = jax.eval_shape(lambda: functional.init_params(cfg, jax.random.key(0)))
    rules = sharding.logical_rules(cfg.mesh)
    anchor = jnp.dtype(cfg.model.anchor_dtype).itemsize
    out = []
    for group, tree in zip(("trainable", "frozen"), boxed):
        specs = nn.logical_to_mesh(nn.get_partition_spec(tree), rules)
        flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
        flat = jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
        for (path, leaf), spec in zip(flat, flat_specs):
            entries = tuple(_mesh_axes(e) for e in list(spec) + [None] * (leaf.ndim - len(spec)))
            itemsize = leaf.dtype.itemsize if group == "trainable" else anchor
            out.append(ParamShard(jax.tree_util.keystr(path), tuple(leaf.shape), math.prod(leaf.shape) * itemsize,
                                  group == "trainable", entries))
    return out


def sharded_axes(param: ParamShard, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes of size > 1 that shard `param` (as `sharding.fit_spec`: an axis group that does
    not divide its dim leaves that dim replicated)."""
    axes: list[str] = []
    for names, dim in zip(param.spec, param.shape):
        if names and dim % math.prod(mesh_shape.get(n, 1) for n in names) == 0:
            axes += [n for n in names if mesh_shape.get(n, 1) > 1]
    return tuple(axes)


def activation_tokens(cfg: ml_collections.ConfigDict) -> list[tuple[str, int, int, int, int]]:
    """(stack, tokens per sample, width, depth, activation all-reduces per block per step) of every
    transformer stack under tensor parallelism: 2 per forward pass (3 with cross-attention), as many
    again backward where gradients flow (module docstring)."""
    m, d = cfg.model, cfg.data
    n_tok = m.latent.tokens_per_modality
    lm_seq = len(MODALITIES) * n_tok + m.bridge.n_constraint_tags + d.text_len + m.bridge.n_queries
    patches = (m.vit.image_size // m.vit.patch_size) ** 2
    enc = m.encoder
    return [
        ("vit", d.num_frames * patches, m.vit.width, m.vit.depth, 2),
        ("lm", lm_seq, m.lm.width, m.lm.depth, 4),
        ("speech", -(-d.mel_frames // 4), enc.width, enc.depth, 4),
        ("text", d.text_len, enc.width, enc.depth, 4),
        ("video", d.num_frames, enc.width, enc.depth, 4),
        ("connector", m.bridge.n_queries, m.bridge.connector.width, m.bridge.connector.depth, 4),
        ("dnfm", 2 * m.action_len, m.dnfm.width, m.dnfm.depth, 4),  # two velocity evaluations
        ("explain", m.explain_len - 1, m.explain.width, m.explain.depth, 6),
    ]


def minimum_bytes(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                  params: list[ParamShard] | None = None) -> dict[tuple[str, tuple[str, ...]], float]:
    """{(kind, mesh axes): bytes per device per step} of the module docstring's model.

    Args:
      mesh_shape: {"data": n, "fsdp": n, "tensor": n}; global batch from `cfg.train`.
      params: `param_table(cfg)` if already computed (it traces the model's init).
    """
    params = param_table(cfg) if params is None else params
    size = lambda axes: math.prod(mesh_shape.get(a, 1) for a in axes)  # noqa: E731
    compute = jnp.dtype(cfg.model.dtype).itemsize
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh_shape.get(a, 1) > 1)
    out: dict[tuple[str, tuple[str, ...]], float] = {}

    def add(kind: str, axes: tuple[str, ...], nbytes: float) -> None:
        if axes and nbytes:
            out[(kind, axes)] = out.get((kind, axes), 0.0) + nbytes

    for p in params:
        axes = sharded_axes(p, mesh_shape)
        other = size(tuple(a for a in axes if a != "fsdp"))  # tensor shards stay local
        if "fsdp" in axes:
            item = p.nbytes / math.prod(p.shape)
            add("all-gather", ("fsdp",), p.nbytes / other * min(compute, item) / item)
        if not p.trainable:
            continue
        if "fsdp" in axes:
            add("reduce-scatter", ("fsdp",), p.nbytes / other)
            add("all-reduce", tuple(a for a in batch_axes if a != "fsdp"), p.nbytes / other / mesh_shape["fsdp"])
        else:
            add("all-reduce", batch_axes, p.nbytes / other)

    if mesh_shape.get("tensor", 1) > 1:
        per_device = int(cfg.train.global_batch_size) // size(("data", "fsdp"))
        for _, tokens, width, depth, passes in activation_tokens(cfg):
            add("all-reduce", ("tensor",), per_device * tokens * width * compute * depth * passes)
    return out


def by_kind(table: dict[tuple[str, tuple[str, ...]], float]) -> dict[str, float]:
    """{kind: bytes} summed over axes."""
    out: dict[str, float] = {}
    for (kind, _), nbytes in table.items():
        out[kind] = out.get(kind, 0.0) + nbytes
    return out
