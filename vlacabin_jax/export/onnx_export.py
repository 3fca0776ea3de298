"""ONNX files from the PyTorch mirror: opset 17-19, dynamic batch, straight-line graphs.

    info = export_onnx(mirror, "exported/vla_cabin.fp32.onnx", opset=18)

Uses the TorchScript-based exporter (`dynamo=False`): the mirror is a fixed Python program (the
K sampler steps and the explanation steps are unrolled when traced), which tracing turns into a
graph without `Loop`/`If`, native `LayerNormalization` at opset >= 17, and no dependency on
onnxscript. The fp16 file is an export of the same mirror built in float16: Flax's mixed-precision
policy is in the mirror, so LayerNorm, RMSNorm, softmax, RoPE and the codebook logits stay float32
in the graph by construction rather than by a converter's guess. Float inputs and outputs are
float32 in both files (frames uint8 in both). Weights go to one external-data file when the graph would pass 2 GB.

Every file passes `onnx.checker` (full check) and strict shape inference, has only the `batch`
dimension symbolic on every input and output, and has no control-flow op, or the export fails.

Inputs, in this order (`torch_model.INPUT_NAMES`; shapes in `torch_model`'s docstring and in the
export's config.json "io"): text_tokens, text_mask, mel, mel_mask, frames, frame_mask,
state_numeric, state_categorical, modality_mask, constraint_tags, history_actions, history_before.
Ids are int32 (TensorRT's integer support is int32 first), masks bool, features float32, and
`frames` uint8 [batch, F, S, S, 3]: raw RGB camera bytes in [0, 255]; the graph's first op on them is
a Cast to float32 followed by x / 255 and the [-1, 1] normalisation (TensorRT takes uint8 network
inputs that go straight into a Cast), so the car feeds the camera's bytes as they are. The two
action-log inputs are int32 [batch, action_len] action-vocabulary ids (action_vocabulary.json):
`history_actions` the earlier turn's executed tokens, `<eos>`, `<pad>` (= 0, masked in the LM),
all `<pad>` without an earlier turn; `history_before` the replaced value of each, `<pad>` elsewhere.
The graph's action decode (`model.dnfm.constrained_decode`) is unrolled over the action positions
(Where / ArgMax, no loop and no boolean indexing); under `model.dnfm.layout = "per_setting"` it is
an ArgMax per setting path and a sort-free reorder (Less / Equal / ReduceSum / Where, no TopK), and
z0, velocities, x1 and action_logits span the setting paths instead of action_len (config.json "io").
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper, shape_inference

from vlacabin_jax.export.torch_model import INPUT_DTYPES, INPUT_NAMES, OUTPUT_NAMES, VLACabinMirror, example_inputs

OPSETS = (17, 18, 19)
CONTROL_FLOW = frozenset({"Loop", "If", "Scan", "SequenceMap"})
# Protobuf's hard limit is 2 GiB; stay clear of it (the graph itself adds to the weights).
EXTERNAL_DATA_BYTES = 1_800_000_000
BATCH = "batch"
# Constant subgraphs the tracer leaves behind (pads, reshape targets) are folded up to this size;
# larger constant expressions would duplicate weights.
FOLD_MAX_ELEMENTS = 1 << 16
_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                      "Bernoulli"}) | CONTROL_FLOW


class OnnxExportError(RuntimeError):
    """The ONNX file is not what the car needs (control flow, a failed check, wrong dims)."""


@dataclasses.dataclass
class OnnxInfo:
    """What `export_onnx` wrote: path, opset, op histogram, size, whether weights are external."""

    path: str
    opset: int
    dtype: str
    ops: dict[str, int]
    bytes: int
    external_data: bool
    inputs: dict[str, list]
    outputs: dict[str, list]


class _TupleOutputs(torch.nn.Module):
    """The mirror with positional inputs and outputs in `OUTPUT_NAMES` order (what the tracer wants)."""

    def __init__(self, mirror: VLACabinMirror):
        super().__init__()
        self.mirror = mirror

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.mirror(**dict(zip(INPUT_NAMES, inputs)))
        return tuple(out[name] for name in OUTPUT_NAMES)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(mirror: VLACabinMirror, path: str | os.PathLike, opset: int = 18,
                trace_batch: int = 2) -> OnnxInfo:
    """Trace `mirror` (fp32 or fp16) into an ONNX file and check it.

    Args:
      mirror: a loaded `VLACabinMirror` in eval mode.
      path: output .onnx file; weights go to `<path>.data` beside it when over ~1.8 GB.
      opset: 17, 18 or 19 (TensorRT 10.3 on Jetson reads up to about 19).
      trace_batch: batch size of the tracing inputs (2, so no size-1 dim gets special-cased).
    Raises:
      OnnxExportError for an unsupported opset, control flow in the graph, a failed checker or shape
      inference, or a non-batch dim that came out symbolic (or a batch dim that came out fixed).
    """
    if opset not in OPSETS:
        raise OnnxExportError(f"opset {opset} not supported: use one of {OPSETS} (TensorRT 10 reads <= 19)")
    path = Path(path)
    mirror = mirror.eval()
    inputs = example_inputs(mirror.config, trace_batch)
    external = param_bytes(mirror) > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        traced = mirror(**inputs)
    # The tracer's own file goes to a private directory: over 2 GB it writes one file per tensor.
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=path.parent) as scratch:
        traced_path = Path(scratch) / "traced.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter warns that it is legacy, and the tracer that Python ints from
            # shapes become constants: both expected (only the batch dim is dynamic, checked below).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _TupleOutputs(mirror), tuple(inputs[k] for k in INPUT_NAMES), str(traced_path), dynamo=False,
                opset_version=opset, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: BATCH} for name in INPUT_NAMES + OUTPUT_NAMES},
                do_constant_folding=True, export_params=True)
        model = onnx.load(str(traced_path), load_external_data=True)
    fold_constants(model)
    drop_identity_casts(model)
    dedupe_initializers(model)
    # Declare every output's static dims (the tracer names the ones its own inference missed).
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(list(dims)[1:], traced[value.name].shape[1:]):
            dim.Clear()
            dim.dim_value = int(size)
    model.producer_name = "vlacabin_jax.export"
    model.doc_string = (f"VLA-Cabin inference, K={mirror.steps} Euler steps unrolled, "
                        f"{str(mirror.dtype).removeprefix('torch.')} compute")
    _save(model, path, external)
    return check_onnx(path, opset, str(mirror.dtype).removeprefix("torch."))


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate nodes whose inputs are all small constants and store their outputs as initializers.

    The TorchScript exporter builds some constant tensors (the pads of `F.pad`, for one) from
    Constant/ConstantOfShape/Concat chains that its own folding leaves; TensorRT wants such inputs
    as initializers, and ONNX shape inference only sees through them once folded.
    Returns the number of nodes removed.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts: dict[str, np.ndarray] = {}

    def small_constant(name: str) -> bool:
        if name in consts:
            return True
        t = inits.get(name)
        return t is not None and int(np.prod(t.dims)) <= FOLD_MAX_ELEMENTS

    keep, folded = [], 0
    for node in graph.node:
        if (node.op_type not in _NO_FOLD and node.domain in ("", "ai.onnx")
                and all(not i or small_constant(i) for i in node.input)):
            feeds = {i: consts[i] if i in consts else numpy_helper.to_array(inits[i]) for i in node.input if i}
            outputs = ReferenceEvaluator(node).run(None, feeds)
            if all(np.asarray(o).size <= FOLD_MAX_ELEMENTS for o in outputs):
                consts.update({name: np.asarray(o) for name, o in zip(node.output, outputs)})
                folded += 1
                continue
        keep.append(node)
    used = {i for node in keep for i in node.input} | {o.name for o in graph.output}
    new = [numpy_helper.from_array(consts[n], n) for n in consts if n in used and n not in inits]
    old = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(old + new)
    info = [v for v in graph.value_info if v.name not in consts]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return folded


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Point every use of byte-identical initializers at one copy.

    The tracer folds `weight.T` once per *use*, so a weight read in every unrolled sampler step or
    decoding step would otherwise be stored K (or explain_len - 1) times. Returns copies removed.
    """
    import hashlib

    keep: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for t in model.graph.initializer:
        data = numpy_helper.to_array(t)
        key = (t.data_type, tuple(t.dims), hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest())
        if key in keep:
            rename[t.name] = keep[key]
        else:
            keep[key] = t.name
    if not rename:
        return 0
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) if i not in outputs else i for i in node.input]
    unique = [t for t in model.graph.initializer if t.name not in rename]
    del model.graph.initializer[:]
    model.graph.initializer.extend(unique)
    return len(rename)


def drop_identity_casts(model: onnx.ModelProto) -> int:
    """Remove Casts to the type their input already has (the mirror's `.to(dtype)` calls are
    no-ops in a float32 mirror but the tracer records them). Returns the number removed."""
    inferred = shape_inference.infer_shapes(weightless(model))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if (node.op_type == "Cast" and node.output[0] not in outputs and types.get(node.input[0]) == to
                and to is not None):
            rename[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    info = [v for v in model.graph.value_info if v.name not in rename]
    del model.graph.value_info[:]
    model.graph.value_info.extend(info)
    return len(rename)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with large initializers reduced to name, type and dims (marked external), so
    in-memory shape inference works on models over protobuf's 2 GB limit without copying weights.
    Small ones keep their values: shape inference reads Reshape targets and the like."""
    stubs = []
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= FOLD_MAX_ELEMENTS and t.data_location != onnx.TensorProto.EXTERNAL:
            stubs.append(t)
            continue
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "weightless"
        stubs.append(stub)
    g = model.graph
    graph = onnx.helper.make_graph(list(g.node), g.name, list(g.input), list(g.output), stubs,
                                   value_info=list(g.value_info))
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `model`; one `<name>.data` file for the weights when external, none left otherwise."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def check_onnx(path: str | os.PathLike, opset: int | None = None, dtype: str = "") -> OnnxInfo:
    """Full checker, strict shape inference, no control flow, batch-only symbolic dims.

    Returns the `OnnxInfo` of the file; raises `OnnxExportError` naming what failed.
    """
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"{path.name}: onnx.checker failed: {e}") from None
    inferred = path.with_name(path.name + ".inferred")
    try:
        shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True,
                                          data_prop=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError / RuntimeError here
        raise OnnxExportError(f"{path.name}: strict shape inference failed: {e}") from None
    finally:
        inferred.unlink(missing_ok=True)
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    flow = sorted(CONTROL_FLOW & set(ops))
    if flow:
        raise OnnxExportError(f"{path.name}: control flow in the graph ({', '.join(flow)}); the mirror must unroll")
    got_opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and got_opset != opset:
        raise OnnxExportError(f"{path.name}: opset {got_opset}, expected {opset}")
    io = {"inputs": {v.name: _dims(v) for v in model.graph.input},
          "outputs": {v.name: _dims(v) for v in model.graph.output}}
    bad = [f"{name} {dims}" for group in io.values() for name, dims in group.items()
           if not dims or dims[0] != BATCH or any(isinstance(d, str) or d <= 0 for d in dims[1:])]
    if bad:
        raise OnnxExportError(f"{path.name}: only the leading batch dim may be symbolic: {', '.join(bad)}")
    if list(io["inputs"]) != list(INPUT_NAMES) or list(io["outputs"]) != list(OUTPUT_NAMES):
        raise OnnxExportError(f"{path.name}: inputs/outputs are {list(io['inputs'])} / {list(io['outputs'])}")
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in model.graph.input}
    wrong = [f"{k} {types[k]} (expected {want})" for k, want in INPUT_DTYPES.items() if types[k] != want]
    if wrong:
        raise OnnxExportError(f"{path.name}: input element types differ from the mirror's: {', '.join(wrong)}")
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return OnnxInfo(str(path), got_opset, dtype, dict(sorted(ops.items())), size, external, **io)


def ort_session(path: str | os.PathLike, threads: int = 0):
    """An ONNX Runtime CPU session (all graph optimisations; `threads` 0 = ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
