"""Compile the trainer's programs for accelerators that are not here (deviceless AOT).

    parse_target("a100:16x1x8")       -> Target (GPU: <slices>x<hosts per slice>x<GPUs per host>)
    parse_target("tpu:v5p-128")       -> Target (TPU slice, cores as GCP names them)
    parse_target("cpu:128")           -> Target (XLA:CPU, 128 simulated devices: the sweep's compiler)
    gpu_target_config(chip)           -> GpuTargetConfigProto text of an NVIDIA chip (device facts)
    check_plugin(target)              -> AotError naming the pip install when the plugin is absent
    target_devices(target)            -> the topology's devices (nothing allocated, nothing attached)
    resolve_mesh(cfg, target, mesh)   -> (data, fsdp, tensor) that fills the target, or AotError
    compile_row(cfg, target, mesh)    -> one row of `aot.json`: memory, FLOPs, collectives, verdict

How: with `jax_platforms=cpu` the host runs JAX on its CPU, while
`jax.experimental.topologies.get_topology_desc` describes the target's devices from libtpu
(TPU) or from the CUDA plugin plus a `GpuTargetConfigProto` (NVIDIA). A `Mesh` over those
devices, the trainer's own shardings and `jax.jit(...).lower(ShapeDtypeStructs).compile()` give
the target's real executable: XLA's memory analysis per device, its cost analysis, and the
optimized HLO with the collectives the target's compiler forms (reduce-scatters on GPU, which
XLA:CPU never forms).

`cpu:N` compiles the same programs with XLA:CPU for N simulated host devices (no plugin; nothing
allocated), the compiler of the XLA:CPU sweeps, so a GPU program's collectives can be set beside
XLA:CPU's for the same mesh at a size the sweep cannot allocate; it has no memory verdict.

Limits, stated in every row: there is no autotuning without a device (default GEMM configs; on
GPU Triton GEMMs are off, as their tiling needs a device), the memory is the compiler's estimate
(no allocator fragmentation, no CUDA context or library workspaces), and the topology string sets
device counts, not link bandwidths.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import ml_collections

# Stated in every row of aot.json (see the module docstring).
LIMITS = ("no autotuning without a device: default GEMM configs (GPU: Triton GEMMs off)",
          "memory is the compiler's estimate: no fragmentation, CUDA context or library workspaces",
          "the topology sets device counts, not link bandwidths")

PROGRAMS = ("init", "train_step", "infer")

# Device facts of NVIDIA chips (XLA's gpu target specs; public data sheets). They feed the
# GpuTargetConfigProto that the CUDA plugin compiles for; jaxlib 0.10.2 rejects newer fields
# (collective_memory_granularity, ...), so only these are written.
GPU_CHIPS: dict[str, dict[str, Any]] = {
    "a100": dict(description="NVIDIA A100-SXM4-80GB", cc=(8, 0), core_count=108, fpus_per_core=64,
                 shared_memory_per_core=167936, shared_memory_per_block_optin=166912,
                 memory_bandwidth=2039040000000, l2_cache_size=41943040, clock_rate_ghz=1.41,
                 device_memory_size=85100068864, peak_bf16_flops=312e12),
    "h100": dict(description="NVIDIA H100 80GB HBM3", cc=(9, 0), core_count=132, fpus_per_core=128,
                 shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
                 memory_bandwidth=3352320000000, l2_cache_size=52428800, clock_rate_ghz=1.98,
                 device_memory_size=84942979072, peak_bf16_flops=989e12),
}

# TPU generations: topology prefix, cores per chip (megacore chips are one JAX device), HBM per
# device, dense bf16 peak per device, and how many dims the slice's torus has.
TPU_CHIPS: dict[str, dict[str, Any]] = {
    "v4": dict(prefix="v4", cores_per_chip=2, megacore=True, hbm=32 * 2**30, peak_bf16_flops=275e12, dims=3),
    "v5p": dict(prefix="v5", cores_per_chip=2, megacore=True, hbm=95 * 2**30, peak_bf16_flops=459e12, dims=3),
    "v5e": dict(prefix="v5e", cores_per_chip=1, megacore=False, hbm=16 * 2**30, peak_bf16_flops=197e12, dims=2),
}

# JAX preallocates this fraction of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION's default);
# a program that needs more fails at run time unless the launcher raises it.
GPU_MEM_FRACTION = 0.75

# The extras of pyproject.toml and what they install (for the missing-plugin error).
INSTALL = {"cuda": "pip install -e '.[aot-gpu]'  (jax-cuda12-plugin==<jax version> nvidia-cuda-nvcc-cu12)",
           "tpu": "pip install -e '.[aot-tpu]'  (libtpu, the version jax[tpu] pins)"}


class AotError(ValueError):
    """An unusable target, mesh or install: one line that says what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator cluster to compile for.

    name: as written ("a100:16x1x8", "tpu:v5p-128", "cpu:128"). platform: "cuda" | "tpu" | "cpu".
    chip: a key of GPU_CHIPS / TPU_CHIPS, or "cpu". num_devices: JAX devices (GPUs; TPU chips, megacore or not).
    topology: "16x1x8" (GPU) or libtpu's "v5:4x4x4". device_memory_bytes: per device.
    mem_fraction: the share of it a program may use (GPU: JAX's preallocation).
    """

    name: str
    platform: str
    chip: str
    num_devices: int
    topology: str
    device_memory_bytes: int
    peak_bf16_flops: float
    mem_fraction: float

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * self.mem_fraction)


# ------------------------------------------------------------------------------------ targets


def torus_dims(chips: int, ndim: int) -> tuple[int, ...]:
    """The slice shape GCP gives `chips` chips: from 2x2(x1), double the smallest dim, the last
    on ties (16 → 2x2x4, 64 → 4x4x4, 128 → 4x4x8; 2-D: 8 → 2x4, 256 → 16x16)."""
    dims = [2, 2] + [1] * (ndim - 2)
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def parse_target(text: str) -> Target:
    """"a100:16x1x8" / "h100:1x1x8" (slices x hosts per slice x GPUs per host) or "tpu:v5p-128" /
    "tpu:v5e-256" / "tpu:v4-8" (GCP slice names: TensorCores for v4/v5p, chips for v5e), or "cpu:N"
    (XLA:CPU, N simulated devices)."""
    kind, sep, spec = text.strip().lower().partition(":")
    gpus, tpus = ", ".join(f"{c}:SLICESxHOSTSxGPUS" for c in GPU_CHIPS), ", ".join(f"tpu:{c}-N" for c in TPU_CHIPS)
    if not sep or (kind not in GPU_CHIPS and kind not in ("tpu", "cpu")):
        raise AotError(f"unknown target {text!r}; use one of {gpus}, {tpus}, cpu:N (e.g. a100:16x1x8, tpu:v5p-128)")
    if kind == "cpu":
        if not spec.isdigit() or int(spec) < 1:
            raise AotError(f"target {text!r}: write cpu:N with N simulated devices, e.g. cpu:128")
        return Target(text.strip(), "cpu", "cpu", int(spec), spec, 0, 0.0, 1.0)
    if kind in GPU_CHIPS:
        parts = spec.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise AotError(f"target {text!r}: write {kind}:SLICESxHOSTSxGPUS with positive sizes, e.g. {kind}:16x1x8")
        chip = GPU_CHIPS[kind]
        return Target(text.strip(), "cuda", kind, math.prod(int(p) for p in parts), spec,
                      chip["device_memory_size"], chip["peak_bf16_flops"], GPU_MEM_FRACTION)
    m = re.fullmatch(r"(v\w+?)-(\d+)", spec)
    if not m or m.group(1) not in TPU_CHIPS:
        raise AotError(f"unknown TPU target {text!r}; use one of {tpus} (e.g. tpu:v5p-128, tpu:v5e-256, tpu:v4-8)")
    gen, cores = m.group(1), int(m.group(2))
    chip = TPU_CHIPS[gen]
    chips = cores // chip["cores_per_chip"]
    if cores % chip["cores_per_chip"] or chips < 4 or chips & (chips - 1):
        smallest = 4 * chip["cores_per_chip"]
        raise AotError(f"target {text!r}: a {gen} slice has {smallest}, {2 * smallest}, {4 * smallest}, ... "
                       f"{'cores' if chip['cores_per_chip'] > 1 else 'chips'} (a power of two from {smallest})")
    topology = f"{chip['prefix']}:" + "x".join(str(d) for d in torus_dims(chips, chip["dims"]))
    return Target(text.strip(), "tpu", gen, chips, topology, chip["hbm"], chip["peak_bf16_flops"], 1.0)


def gpu_target_config(chip: str) -> str:
    """GpuTargetConfigProto text (stream_executor) of `chip`: what ptxas and XLA's cost models
    need to know about the device; no driver is asked."""
    c = GPU_CHIPS[chip]
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                shared_memory_per_core=c["shared_memory_per_core"], threads_per_core_limit=2048,
                core_count=c["core_count"], fpus_per_core=c["fpus_per_core"], block_dim_limit_x=2147483647,
                block_dim_limit_y=65535, block_dim_limit_z=65535, memory_bandwidth=c["memory_bandwidth"],
                l2_cache_size=c["l2_cache_size"], clock_rate_ghz=c["clock_rate_ghz"],
                device_memory_size=c["device_memory_size"],
                shared_memory_per_block_optin=c["shared_memory_per_block_optin"],
                registers_per_core_limit=65536, registers_per_block_limit=65536, thread_dim_limit_x=1024,
                thread_dim_limit_y=1024, thread_dim_limit_z=64)
    lines = [f"  {k}: {v}" for k, v in info.items()]
    major, minor = c["cc"]
    lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor} }}")
    return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 patch: 0 }}\n'
            f'device_description_str: "{c["description"]}"\n')


def check_plugin(target: Target) -> None:
    """AotError with the install command when the target's compiler is not installed (or its
    version does not match jaxlib's)."""
    if target.platform == "cpu":
        return  # XLA:CPU is part of jaxlib
    module = "jax_cuda12_plugin" if target.platform == "cuda" else "libtpu"
    if importlib.util.find_spec(module) is None:
        raise AotError(f"target {target.name} needs the {module} package, which is not installed; run "
                       f"{INSTALL[target.platform]}")
    if target.platform == "cuda":
        want, have = importlib.metadata.version("jaxlib"), importlib.metadata.version("jax-cuda12-plugin")
        if want != have:
            raise AotError(f"target {target.name}: jax-cuda12-plugin {have} does not match jaxlib {want}; run "
                           f"pip install jax-cuda12-plugin=={want}")


def prepare_host(cpu_devices: int = 0) -> None:
    """Run JAX on this host's CPU (the target's plugins only describe and compile) and let libtpu
    load beside other JAX processes; with `cpu_devices`, XLA:CPU gets that many (a `cpu:N`
    target). Call before anything touches a JAX backend."""
    import jax

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold its lockfile
    jax.config.update("jax_platforms", "cpu")
    if cpu_devices:
        cpu_devices_before_start(cpu_devices)


def target_devices(target: Target) -> list:
    """The target's devices, in topology order (GPU: slice, host, GPU; TPU: libtpu's order)."""
    from jax.experimental import topologies

    check_plugin(target)
    prepare_host()
    if target.platform == "cpu":
        return cpu_devices(target.num_devices)
    if target.platform == "cuda":
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target.chip),
                                            topology=target.topology)
    else:
        dims = tuple(int(d) for d in target.topology.split(":")[1].split("x"))
        wrap = all(d % 4 == 0 for d in dims)  # full 4x4x4 cubes (and v5e's 16x16) close into tori
        kwargs = {"chip_config_name": "megacore"} if TPU_CHIPS[target.chip]["megacore"] else {}
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, num_slices=1,
                                            chips_per_host_bounds=(2, 2, 1), wrap=(wrap,) * 3, **kwargs)
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise AotError(f"target {target.name}: the topology has {len(devices)} devices, expected {target.num_devices}")
    return devices


def cpu_devices_before_start(n: int) -> None:
    """Asks XLA:CPU for at least n devices (`jax_num_cpu_devices`, which overrides XLA_FLAGS' device
    count) if its backend has not started; else nothing (`cpu_devices` then checks what there is)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
    except RuntimeError:  # the backend has started: whatever it has must do
        pass


def cpu_devices(n: int) -> list:
    """n XLA:CPU devices (`cpu_devices_before_start`); AotError when the backend runs with fewer."""
    import jax

    cpu_devices_before_start(n)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise AotError(f"target cpu:{n}: XLA:CPU runs with {len(devices)} devices; start the command with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return devices[:n]


def compiler_options(target: Target) -> dict[str, Any]:
    """XLA options of every compile: Triton GEMMs need autotuning on a device to find tile sizes
    ("Couldn't find output tile sizes that satisfy hlo"), so GPU GEMMs go to cuBLAS."""
    return {"xla_gpu_enable_triton_gemm": False} if target.platform == "cuda" else {}


# ------------------------------------------------------------------------------------ meshes


def resolve_mesh(cfg: ml_collections.ConfigDict, target: Target,
                 mesh: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(data, fsdp, tensor): `mesh`, or the config's (`-1` = the rest of the target's devices);
    AotError when it does not fill the target or does not divide the batch or the heads."""
    from vlacabin_jax import sharding
    from vlacabin_jax.train.loop import check_mesh

    n = target.num_devices
    try:
        shape = sharding.mesh_shape(cfg.mesh, n) if mesh is None else tuple(mesh)
    except sharding.MeshError as e:
        raise AotError(f"target {target.name} ({n} devices), config mesh: {e}") from None
    if math.prod(shape) != n:
        name = "x".join(map(str, shape))
        raise AotError(f"mesh {name} has {math.prod(shape)} devices but target {target.name} has {n}; use "
                       f"DATAxFSDPxTENSOR sizes whose product is {n}")
    try:
        check_mesh(cfg, dict(zip(sharding.MESH_AXES, shape)))
    except sharding.MeshError as e:
        raise AotError(f"mesh {'x'.join(map(str, shape))} on {target.name}: {e}") from None
    return shape


def with_mesh(cfg: ml_collections.ConfigDict, shape: tuple[int, int, int]) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose mesh sizes are `shape`."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(s) for s in shape)
    return cfg


# ------------------------------------------------------------------------------------ programs


def abstract_batch(cfg: ml_collections.ConfigDict, mesh, rows: int) -> dict:
    """The train batch as ShapeDtypeStructs [rows, ...] with the step's batch shardings."""
    import jax

    from vlacabin_jax.data.spec import batch_spec
    from vlacabin_jax.train import step as step_lib

    shardings = step_lib.batch_shardings(cfg, mesh)
    spec = batch_spec(cfg, rows)
    return {k: jax.ShapeDtypeStruct(spec[k][0], spec[k][1], sharding=s) for k, s in shardings.items()}


def trainer_programs(cfg: ml_collections.ConfigDict, mesh) -> dict[str, Callable[[], Any]]:
    """{program: () -> jax Lowered} of the trainer's own jitted functions on `mesh`, from
    ShapeDtypeStructs: state init with its shardings, the train step (state donated), `infer` at
    one request per batch shard."""
    import flax.linen as nn
    import jax

    from vlacabin_jax.model import functional
    from vlacabin_jax.train import state as state_lib
    from vlacabin_jax.train import step as step_lib
    from vlacabin_jax.train.optimizer import make_optimizer

    abstract, shardings = state_lib.state_shardings(cfg, mesh)
    state = state_lib.abstract_with_shardings(abstract, shardings)
    tx, seed = make_optimizer(cfg), int(cfg.train.seed)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def init():
        # `create_train_state` runs this jit at once; here it is only lowered (`_boxed_state` is the
        # state's own builder, so the init program is the trainer's).
        fn = jax.jit(lambda: nn.unbox(state_lib._boxed_state(cfg, tx, seed)), out_shardings=shardings)
        return fn.lower()

    def train_step():
        step = step_lib.make_train_step(cfg, mesh, shardings)
        return step.lower(state, abstract_batch(cfg, mesh, int(cfg.train.global_batch_size)))

    def infer():
        fn = jax.jit(lambda tr, fr, b: functional.infer(tr, fr, b, cfg),
                     in_shardings=(shardings.trainable, shardings.frozen, step_lib.batch_shardings(cfg, mesh)))
        return fn.lower(state.trainable, state.frozen, abstract_batch(cfg, mesh, batch_ways))

    return {"init": init, "train_step": train_step, "infer": infer}


def memory_of(compiled) -> dict[str, int]:
    """Per-device bytes of XLA's memory analysis; total = arguments + outputs + temporaries -
    aliases (donated buffers the outputs reuse)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def flops_of(compiled) -> float | None:
    """XLA's FLOPs of one execution per device. The CUDA plugin's executable has no cost analysis
    on this path; XLA's HLO cost analysis of its optimized module (run with the CPU client) does."""
    import jax

    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - any backend may refuse; the fallback below decides
        ca = None
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    if ca and "flops" in ca:
        return float(ca["flops"])
    try:
        from jax._src.lib import xla_client

        module = compiled.runtime_executable().hlo_modules()[0]
        ca = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        return float(ca["flops"]) if "flops" in ca else None
    except Exception:  # noqa: BLE001 - FLOPs are a report, not a requirement
        return None


def analyse(compiled, target: Target, mesh_shape: dict[str, int]) -> dict:
    """Memory, FLOPs and collectives (by unique channel id, with the mesh axes they span) of one
    compiled program, plus its HLO text under "hlo" (the caller decides whether to keep it)."""
    from vlacabin_jax.perf import hlo

    text = compiled.as_text()
    colls = hlo.collectives(text)
    axes: dict[str, list[str]] = {}
    for c in colls:
        if c.group_size != 1:
            axes.setdefault(c.kind, [])
            axes[c.kind] = sorted(set(axes[c.kind]) | set(hlo.group_axes(c.groups, mesh_shape)))
    kinds = hlo.by_channel(colls)
    # The same counts per set of mesh axes the groups span (the projection places each set on its links).
    per_axes: dict[tuple[str, ...], list] = {}
    for c in colls:
        if c.group_size != 1:
            per_axes.setdefault(hlo.group_axes(c.groups, mesh_shape), []).append(c)
    split = {a: hlo.by_channel(cs) for a, cs in per_axes.items()}
    for kind, row in kinds.items():
        row["axes"] = axes.get(kind, [])
        row["by_axes"] = {",".join(a): s[kind] for a, s in split.items() if s[kind]["ops"]}
    # The XLA:CPU sweep's convention beside it (`measure.prepare_train_step`): every collective
    # instruction x its loop trips, no merging by channel id.
    instruction_bytes = hlo.bytes_by_kind(colls)
    return {"memory": memory_of(compiled), "hlo_flops": flops_of(compiled), "collectives": kinds,
            "instruction_bytes": instruction_bytes, "hlo": text}


def compile_program(lower: Callable[[], Any], target: Target, mesh_shape: dict[str, int]) -> dict:
    """Lower and compile one program; {"compile_s", "memory", "hlo_flops", "collectives", "hlo"}
    or {"compile_s", "error"} (a TPU program that does not fit fails to compile: "out_of_memory")."""
    t0 = time.perf_counter()
    try:
        lowered = lower()
        compiled = lowered.compile(compiler_options(target) or None)
    except Exception as e:  # noqa: BLE001 - a failed program is a row, not a crash of the sweep
        message = " ".join(str(e).split())[:400]
        return {"compile_s": time.perf_counter() - t0, "error": message,
                "out_of_memory": "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()}
    compile_s = time.perf_counter() - t0
    return {"compile_s": compile_s, "lowered_flops": lowered_flops(lowered, target.num_devices),
            **analyse(compiled, target, mesh_shape)}


def lowered_flops(lowered, num_devices: int) -> float | None:
    """FLOPs per device of the program before XLA optimizes it (the global program / devices;
    rematerialized blocks included, loop bodies counted once). On GPU the compiled count misses
    the matmuls: they become cuBLAS custom calls, which XLA's cost analysis counts as 0."""
    import jax

    try:
        ca = lowered.cost_analysis()
        if not ca:  # a CUDA-topology Lowered has none: analyse its HLO with the CPU client
            from jax._src.lib import xla_client

            module = lowered.compiler_ir("hlo").get_hlo_module()
            ca = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    except Exception:  # noqa: BLE001 - FLOPs are a report, not a requirement
        return None
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    return float(ca["flops"]) / num_devices if ca and "flops" in ca else None


def compile_row(cfg: ml_collections.ConfigDict, target: Target, mesh: tuple[int, int, int] | None = None,
                programs: Sequence[str] = PROGRAMS, devices: list | None = None,
                keep_hlo: bool = False, log: Callable[[str], None] = lambda _: None) -> dict:
    """One row of aot.json: `cfg`'s programs compiled for `target` on `mesh` (default: the config's).

    Returns {"target", "chip", "platform", "mesh", "num_devices", "global_batch", "per_device_batch",
    "device_memory_bytes", "usable_bytes", "bytes_per_device" (the train step's total), "headroom_bytes",
    "fits", "programs": {name: compile_program's dict}, "collective_bytes" / "collective_ops" (train
    step, by kind), "analytic_bytes" (the least each kind needs, `analytic.minimum_bytes`), "flops",
    "compile_s", "limits"}; the HLO texts stay under programs[name]["hlo"] only if `keep_hlo`.
    """
    from vlacabin_jax import sharding
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.perf import analytic

    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise AotError(f"unknown program {unknown[0]!r}; use some of {', '.join(PROGRAMS)}")
    shape = resolve_mesh(cfg, target, mesh)
    cfg = with_mesh(cfg, shape)
    devices = target_devices(target) if devices is None else devices
    jax_mesh = sharding.make_mesh(cfg.mesh, devices)
    mesh_shape = dict(jax_mesh.shape)
    lowerers = trainer_programs(cfg, jax_mesh)
    results = {}
    for name in programs:
        log(f"  {target.name} {'x'.join(map(str, shape))}: compiling {name} ...")
        results[name] = compile_program(lowerers[name], target, mesh_shape)
        if not keep_hlo:
            results[name].pop("hlo", None)
        log(f"  {target.name} {'x'.join(map(str, shape))}: {name} "
            f"{'failed: ' + results[name]['error'] if 'error' in results[name] else 'compiled'} "
            f"in {results[name]['compile_s']:.1f} s")

    batch = int(cfg.train.global_batch_size)
    row: dict[str, Any] = {
        "target": target.name, "chip": target.chip, "platform": target.platform, "topology": target.topology,
        "mesh": "x".join(map(str, shape)), "num_devices": target.num_devices, "variant": cfg.get("variant", ""),
        "global_batch": batch, "per_device_batch": batch / (shape[0] * shape[1]),
        "remat": bool(cfg.model.remat), "remat_policy": cfg.model.get("remat_policy", ""),
        "device_memory_bytes": target.device_memory_bytes, "mem_fraction": target.mem_fraction,
        "usable_bytes": target.usable_bytes, "programs": results,
        "compile_s": sum(r["compile_s"] for r in results.values()), "limits": list(LIMITS)}
    step = results.get("train_step", {})
    # The verdict covers every compiled program (init holds the new state and its RNG temporaries);
    # `bytes_per_device` is the train step's, the program that runs all along.
    totals = {n: r["memory"]["total_bytes"] for n, r in results.items() if r.get("memory")}
    largest = max(totals.values()) if totals else None
    row["largest_program"] = max(totals, key=totals.get) if totals else None
    if step.get("memory"):
        total = step["memory"]["total_bytes"]
        known = target.device_memory_bytes > 0  # cpu:N has no device memory to fit
        row.update(bytes_per_device=total, headroom_bytes=target.usable_bytes - largest if known else None,
                   fits=largest <= target.usable_bytes if known else None)
    else:
        row.update(bytes_per_device=None, headroom_bytes=None,
                   fits=False if any(r.get("out_of_memory") for r in results.values()) else None)
    if "collectives" in step:
        row["collective_bytes"] = {k: v["bytes"] for k, v in step["collectives"].items()}
        row["collective_ops"] = {k: v["ops"] for k, v in step["collectives"].items()}
    else:
        row["collective_bytes"], row["collective_ops"] = {}, {}
    row["analytic_bytes"] = analytic.by_kind(analytic.minimum_bytes(cfg, mesh_shape))
    model_flops = model_flops_per_sample(cfg) * batch / target.num_devices
    # TPU's compiled cost analysis counts the matmuls; the CUDA one does not (`lowered_flops`).
    hlo_flops = step.get("hlo_flops") if target.platform == "tpu" else step.get("lowered_flops")
    row["flops"] = {"model_per_device": model_flops, "hlo_per_device": hlo_flops,
                    "hlo_source": "compiled" if target.platform == "tpu" else "lowered (before XLA's passes)",
                    "compiled_per_device": step.get("hlo_flops"), "lowered_per_device": step.get("lowered_flops"),
                    "hlo_over_model": hlo_flops / model_flops if hlo_flops and model_flops else None,
                    "peak_bf16_per_device": target.peak_bf16_flops}
    return row


# ------------------------------------------------------------------------------------ output


def write_results(out, rows: list[dict], config: str) -> None:
    """`out/aot.json` ({"config", "limits", "rows"}) and `out/aot.png` (`plot_rows`)."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "limits": list(LIMITS), "rows": rows}
    (out / "aot.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
    plot_rows(rows, out / "aot.png")


def plot_rows(rows: list[dict], path) -> None:
    """Left: the train step's GiB per device (arguments, outputs not aliased, temporaries) per
    target x mesh against the usable memory. Right: its collective bytes by kind against the
    analytic minimum (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlacabin_jax.perf.hlo import KINDS

    fig, (ax_m, ax_c) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['target']}\n{r['mesh']}" for r in rows]
    gib = 2.0**30
    bottom = [0.0] * len(rows)
    for part, key in (("arguments", "argument_bytes"), ("outputs - aliased", None), ("temporaries", "temp_bytes")):
        values = []
        for r in rows:
            m = r["programs"].get("train_step", {}).get("memory") or {}
            v = (m.get("output_bytes", 0) - m.get("alias_bytes", 0)) if key is None else m.get(key, 0)
            values.append(max(v, 0) / gib)
        ax_m.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax_m.hlines(r["usable_bytes"] / gib, i - 0.4, i + 0.4, colors="k", linestyles="--")
        ax_m.text(i, bottom[i], {True: "fits", False: "does not fit", None: "?"}[r["fits"]], ha="center",
                  va="bottom", fontsize=8)
    ax_m.set_ylabel("GiB per device (train step)")
    ax_m.set_title("memory (dashed: usable)")
    ax_m.legend(fontsize=8)
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [k + i * width for k in range(len(KINDS))]
        ax_c.bar(xs, [r["collective_bytes"].get(k, 0.0) / 2**20 for k in KINDS], width * 0.9,
                 label=f"{r['target']} {r['mesh']}")
        minimum = [(x, r["analytic_bytes"][k] / 2**20) for x, k in zip(xs, KINDS) if r["analytic_bytes"].get(k)]
        if minimum:
            ax_c.scatter(*zip(*minimum), marker="_", s=200, c="k")
    ax_c.set_xticks([k + 0.4 - width / 2 for k in range(len(KINDS))], KINDS, fontsize=8)
    ax_c.set_yscale("log")
    ax_c.set_ylim(bottom=1e-2)  # bars rise from 10 KiB; kinds the program lacks draw none
    ax_c.set_ylabel("MiB per device per step (black: analytic minimum)")
    ax_c.set_title("collectives of the compiled train step")
    ax_c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
