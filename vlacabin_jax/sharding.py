"""Mesh construction and the logical-axis rules that map every parameter and activation onto it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params sharded over `embed`),
`tensor` (tensor parallel over mlp / heads / vocab). One rule table, overridable from the config
(`mesh.rules_override = "mlp=fsdp,vocab="`).

Activations are constrained too (`constrain`, called by the model's dense layers): rows over
(data, fsdp), the model width replicated, heads / mlp / vocab over tensor. Without them XLA gives
activations the weights' `embed -> fsdp` sharding and contracts dense layers over a sharded
dimension (all-reducing partial activations). The constraints bind only inside
`activation_sharding(mesh, rules)`, which the train and eval steps enter while they are traced;
anywhere else (single device, tests, export, inference) `constrain` returns its input unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("latent", None),
    ("lm_embed", None),
    ("vit_embed", None),
    ("embed_out", None),
    ("state_vocab", None),
    ("lora", None),  # LoRA rank axis (a few entries): replicated
    # Activations (`constrain`): rows over every data-parallel axis, the model width replicated
    # (a dense layer then contracts over a whole dimension: no partial sums to all-reduce), the
    # tensor-parallel dims as their weights.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class MeshError(ValueError):
    """The configured mesh does not fit the devices or the model."""


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolve (data, fsdp, tensor) sizes; one of them may be -1 (= the devices left over)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: {known} does not divide the {num_devices} "
                            f"devices; set the sizes so their product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                        f"{num_devices} are available; make data*fsdp*tensor = {num_devices} or use -1")
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all, across processes) with axes `MESH_AXES`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        # Simulated / irregular topologies: a plain reshape is the only layout there is.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, object], ...]:
    """DEFAULT_RULES with `mesh_cfg.rules_override` ("name=axis,name=axis+axis,name=") applied."""
    rules = dict(DEFAULT_RULES)
    override = mesh_cfg.get("rules_override", "") or ""
    for item in filter(None, (s.strip() for s in override.split(","))):
        name, sep, target = item.partition("=")
        if not sep or name.strip() not in rules:
            raise MeshError(f"mesh.rules_override entry {item!r}: expected NAME=AXIS with NAME one of "
                            f"{', '.join(rules)}")
        axes = tuple(a for a in target.strip().split("+") if a)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise MeshError(f"mesh.rules_override entry {item!r}: unknown mesh axis {bad[0]!r}; "
                            f"use {', '.join(MESH_AXES)} or nothing")
        rules[name.strip()] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(rules.items())


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (such a dim is replicated instead)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return PartitionSpec(*[e if dim % _axis_size(mesh, e) == 0 else None for e, dim in zip(entries, shape)])


def param_shardings(boxed_params, mesh: Mesh, rules) -> object:
    """NamedShardings for a boxed (LogicallyPartitioned) param tree, abstract or concrete."""
    specs = nn.get_partition_spec(boxed_params)
    specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(boxed_params)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, x.shape, mesh)), specs, shapes,
                        is_leaf=lambda s: isinstance(s, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


# The mesh the model's activation constraints bind to while a step is traced (None: no-op).
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """Inside: `constrain` pins activations onto `mesh` through the logical rules `rules`.

    Enter it in the function being traced (the body of a jitted step), not around `jax.jit`:
    the constraints are placed when the model is traced.
    """
    token = _ACTIVATION_MESH.set(mesh)
    try:
        with nn.logical_axis_rules(rules):
            yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`nn.with_logical_constraint(x, axes)` on the mesh of `activation_sharding`; `x` itself
    outside it. A logical axis whose mesh axes do not divide its dimension is left replicated."""
    mesh = _ACTIVATION_MESH.get()
    rules = nn.get_logical_axis_rules()
    if mesh is None or not rules:
        return x
    mesh_axes = nn.logical_to_mesh_axes(axes, rules)
    fitted = tuple(name if dim % _axis_size(mesh, entry) == 0 else None
                   for name, entry, dim in zip(axes, mesh_axes, x.shape))
    return nn.with_logical_constraint(x, fitted, rules=rules, mesh=mesh)
