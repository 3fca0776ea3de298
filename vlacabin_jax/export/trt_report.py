"""TensorRT 10 readiness of an ONNX file: every op against the parser's native support, and the
`trtexec` command lines that build engines with min/opt/max batch shapes.

    report = trt_report("exported/vla_cabin.fp32.onnx", fp16_onnx="exported/vla_cabin.fp16.onnx")

The support table is onnx-tensorrt's operator matrix for TensorRT 10.x (opsets 9-20), restricted to
what matters here: the op, the tensor types it takes natively, and restrictions that can be checked
on the graph (inputs that must be initializers). An op not in the table, a type outside its list, a
violated restriction or an opset above `MAX_OPSET` is flagged; nothing is run (no GPU here).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, shape_inference

MAX_OPSET = 20  # TensorRT 10.0-10.x parse opsets 9..20; JetPack 6 (TensorRT 10.3) is safest at <= 19
RECOMMENDED_OPSET = 19

F = ("float32", "float16", "bfloat16")
I = ("int32", "int64")
B = ("bool",)


@dataclasses.dataclass(frozen=True)
class Support:
    """Native TensorRT support of one ONNX op: allowed element types of the checked inputs, and
    the input positions that must be initializers (constants) for the parser."""

    types: tuple[str, ...]
    constant_inputs: tuple[int, ...] = ()
    note: str = ""


# onnx-tensorrt operator matrix (TensorRT 10.x), ops a transformer export can contain.
TRT10: dict[str, Support] = {
    "Abs": Support(F + I), "Add": Support(F + I), "And": Support(B), "ArgMax": Support(F + I),
    "ArgMin": Support(F + I), "AveragePool": Support(F), "BatchNormalization": Support(F),
    "Cast": Support(F + I + B + ("uint8", "int8")), "Ceil": Support(F), "Clip": Support(F + I),
    "Concat": Support(F + I + B), "Constant": Support(F + I + B), "ConstantOfShape": Support(F + I + B),
    "Conv": Support(F, (1,), "1D convs are parsed as 2D; weights must be an initializer"),
    "ConvTranspose": Support(F, (1,)), "Cos": Support(F), "CumSum": Support(F + I, (1,)),
    "DepthToSpace": Support(F + I), "Div": Support(F + I), "Einsum": Support(F), "Equal": Support(F + I + B),
    "Erf": Support(F), "Exp": Support(F), "Expand": Support(F + I + B), "EyeLike": Support(F + I + B),
    "Flatten": Support(F + I + B), "Floor": Support(F), "Gather": Support(F + I + B),
    "GatherElements": Support(F + I), "GatherND": Support(F + I), "Gelu": Support(F), "Gemm": Support(F),
    "GlobalAveragePool": Support(F), "Greater": Support(F + I), "GreaterOrEqual": Support(F + I),
    "GroupNormalization": Support(F), "Identity": Support(F + I + B),
    "InstanceNormalization": Support(F), "IsInf": Support(F), "IsNaN": Support(F),
    "LayerNormalization": Support(F, note="INormalizationLayer; keep it fp32 in fp16 engines"),
    "LeakyRelu": Support(F), "Less": Support(F + I), "LessOrEqual": Support(F + I), "Log": Support(F),
    "LogSoftmax": Support(F), "MatMul": Support(F), "Max": Support(F + I), "MaxPool": Support(F),
    "Mean": Support(F + I), "Min": Support(F + I), "Mod": Support(F + I), "Mul": Support(F + I),
    "Neg": Support(F + I), "NonZero": Support(F + I + B), "Not": Support(B), "OneHot": Support(F + I + B),
    "Or": Support(B), "Pad": Support(F + I + B), "Pow": Support(F), "PRelu": Support(F),
    "Range": Support(F + I), "Reciprocal": Support(F), "ReduceL2": Support(F), "ReduceMax": Support(F + I),
    "ReduceMean": Support(F + I), "ReduceMin": Support(F + I), "ReduceProd": Support(F + I),
    "ReduceSum": Support(F + I), "ReduceSumSquare": Support(F + I), "Relu": Support(F + I),
    "Reshape": Support(F + I + B), "Resize": Support(F), "Round": Support(F), "ScatterElements": Support(F + I),
    "ScatterND": Support(F + I + B), "Shape": Support(F + I + B), "Sigmoid": Support(F), "Sign": Support(F + I),
    "Sin": Support(F), "Size": Support(F + I + B), "Slice": Support(F + I + B, (3,), "axes must be constant"),
    "Softmax": Support(F), "Softplus": Support(F), "Split": Support(F + I + B), "Sqrt": Support(F),
    "Squeeze": Support(F + I + B, (1,)), "Sub": Support(F + I), "Sum": Support(F + I), "Tanh": Support(F),
    "Tile": Support(F + I + B), "TopK": Support(F + I, (1,)), "Transpose": Support(F + I + B),
    "Trilu": Support(F + I + B), "Unsqueeze": Support(F + I + B, (1,), "axes must be constant"),
    "Where": Support(F + I + B), "Xor": Support(B),
}

_TYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
               TensorProto.INT32: "int32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool",
               TensorProto.DOUBLE: "float64", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
               TensorProto.INT16: "int16", TensorProto.UINT32: "uint32", TensorProto.UINT64: "uint64"}


def _types(model: onnx.ModelProto) -> dict[str, str]:
    inferred = shape_inference.infer_shapes(model)
    out = {v.name: _TYPE_NAMES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
           for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    out.update({t.name: _TYPE_NAMES.get(t.data_type, str(t.data_type)) for t in model.graph.initializer})
    return out


def op_table(path: str | Path) -> dict[str, Any]:
    """Every op of the graph with its count, the element types it sees, and TensorRT 10 status.

    Returns {"opset", "ops": {op: {"count", "types", "native", "note"}}, "flags": [str]}.
    """
    model = onnx.load(str(path), load_external_data=False)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types = _types(model)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    counts = Counter(n.op_type for n in model.graph.node)
    seen: dict[str, set[str]] = {op: set() for op in counts}
    flags: list[str] = []
    if opset > MAX_OPSET:
        flags.append(f"opset {opset} is above {MAX_OPSET}, the newest TensorRT 10 parses")
    elif opset > RECOMMENDED_OPSET:
        flags.append(f"opset {opset}: JetPack 6 (TensorRT 10.3) is safest at opset <= {RECOMMENDED_OPSET}")
    for node in model.graph.node:
        data = [types.get(i, "?") for i in node.input if i and i not in constants][:1] or \
               [types.get(i, "?") for i in node.input if i][:1]
        seen[node.op_type].update(data if node.op_type != "Cast" else [types.get(node.output[0], "?")])
        support = TRT10.get(node.op_type)
        if support is None or node.domain not in ("", "ai.onnx"):
            continue
        for pos in support.constant_inputs:
            if pos < len(node.input) and node.input[pos] and node.input[pos] not in constants:
                flags.append(f"{node.op_type} {node.name}: input {pos} must be an initializer for TensorRT")
    ops = {}
    for op, count in sorted(counts.items()):
        support = TRT10.get(op)
        used = sorted(t for t in seen[op] if t != "?")
        bad_types = [t for t in used if support and t not in support.types]
        native = support is not None and not bad_types
        if support is None:
            flags.append(f"{op} (x{count}) is not a native TensorRT 10 ONNX op (needs a plugin or a rewrite)")
        elif bad_types:
            flags.append(f"{op} (x{count}) on {', '.join(bad_types)}: TensorRT 10 takes {', '.join(support.types)}")
        if "float64" in used:
            flags.append(f"{op} uses float64, which TensorRT casts down to float32")
        ops[op] = {"count": count, "types": used, "native": native, "note": support.note if support else ""}
    return {"opset": opset, "ops": ops, "flags": flags}


def _shape_arg(shapes: dict[str, list[int]], batch: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in [batch] + dims[1:])}" for name, dims in shapes.items())


def trtexec_commands(path: str | Path, fp16_path: str | Path | None, min_batch: int = 1, opt_batch: int = 1,
                     max_batch: int = 8) -> dict[str, str]:
    """`trtexec` command lines (run from the export directory) for the engines worth building.

    fp16: from the fp16 ONNX with --stronglyTyped, so TensorRT keeps the graph's float32 islands
      (LayerNorm, softmax, RoPE, codebook logits) instead of choosing fp16 there itself.
    fp16_from_fp32: from the fp32 ONNX with --fp16 (weakly typed; TensorRT may run LayerNorm in fp16,
      which can overflow: compare its outputs before use).
    bf16: from the fp32 ONNX with --bf16 (Ampere and newer, Jetson Orin included).
    fp32: the reference engine.
    """
    model = onnx.load(str(path), load_external_data=False)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    shape_flags = (f"--minShapes={_shape_arg(shapes, min_batch)} --optShapes={_shape_arg(shapes, opt_batch)} "
                   f"--maxShapes={_shape_arg(shapes, max_batch)}")
    name = Path(path).name
    stem = name.removesuffix(".onnx").removesuffix(".fp32")

    def cmd(onnx_name: str, engine: str, extra: str) -> str:
        flags = " ".join(f for f in (extra, shape_flags) if f)
        return f"trtexec --onnx={shlex.quote(onnx_name)} --saveEngine={shlex.quote(engine)} {flags}"

    out = {}
    if fp16_path is not None:
        out["fp16"] = cmd(Path(fp16_path).name, f"{stem}.fp16.plan", "--stronglyTyped")
    out["fp16_from_fp32"] = cmd(name, f"{stem}.fp16w.plan", "--fp16")
    out["bf16"] = cmd(name, f"{stem}.bf16.plan", "--bf16")
    out["fp32"] = cmd(name, f"{stem}.fp32.plan", "")
    return out


def trt_report(path: str | Path, fp16_onnx: str | Path | None = None, min_batch: int = 1, opt_batch: int = 1,
               max_batch: int = 8) -> dict[str, Any]:
    """Op table and flags of both files, and the trtexec command lines."""
    report = {"tensorrt": "10.x (onnx-tensorrt operator matrix; opsets 9-20)",
              "files": {Path(path).name: op_table(path)},
              "trtexec": trtexec_commands(path, fp16_onnx, min_batch, opt_batch, max_batch),
              "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch}}
    if fp16_onnx is not None:
        report["files"][Path(fp16_onnx).name] = op_table(fp16_onnx)
    report["flags"] = [f"{name}: {flag}" for name, table in report["files"].items() for flag in table["flags"]]
    report["native"] = not report["flags"]
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The op list with TensorRT status, the flags and the commands, as text."""
    lines = [f"TensorRT report ({report['tensorrt']})"]
    for name, table in report["files"].items():
        lines.append(f"{name} (opset {table['opset']}):")
        for op, row in table["ops"].items():
            mark = "native" if row["native"] else "NOT NATIVE"
            lines.append(f"  {op:20s} x{row['count']:<5d} {','.join(row['types']):24s} {mark} {row['note']}".rstrip())
    lines += [f"FLAG {flag}" for flag in report["flags"]] or ["every op is native to TensorRT 10"]
    lines += [f"{kind}: {command}" for kind, command in report["trtexec"].items()]
    return lines
