"""An export directory, verified: the PyTorch mirror (safetensors), ONNX fp32 + fp16, the vocabularies.

    report = export(checkpoint="runs/demo/checkpoints", out="exported/", steps=None)
    report = export(out="/tmp/smoke", config=get_config("tiny"), random_init=True)

Writes into a temporary directory beside `out` and renames it into place only when every check
passed, so a failed export leaves nothing behind:

  model.safetensors        the PyTorch mirror's weights (float32; `vlacabin_jax.export.torch_model`)
  config.json              rebuilds the mirror (`load_mirror(dir)`), with I/O names, shapes and provenance
                           (and the per-setting tables under `model.dnfm.layout = "per_setting"`)
  action_vocabulary.json   the action-token vocabulary (ids of `action_tokens`)
  tokenizer.json, tokenizer_config.json   the text tokenizer (ids of `explanation_tokens`)
  vla_cabin.fp32.onnx, vla_cabin.fp16.onnx   (+ `.data` beside a file over 2 GB)
  export_report.json       verification (JAX vs PyTorch vs ONNX Runtime), ONNX checks, ORT CPU latency
  trt_report.json          with trt=True: op list vs TensorRT 10, trtexec command lines

torch, onnx and onnxruntime are imported only once an export runs (`check_extra` says what is missing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ONNX_STEM = "vla_cabin"
MAX_STEPS = 8
OPSETS = (17, 18, 19)
# The `export` extra (pyproject.toml); torch first, from the CPU wheel, so nothing pulls a CUDA build.
EXTRA_MODULES = ("torch", "onnx", "onnxruntime", "safetensors")
INSTALL = "pip install torch==2.13.0 && pip install -e '.[export]'"


def _input_error(message: str) -> Exception:
    from vlacabin_jax.export.source import ExportInputError

    return ExportInputError(message)


def check_extra() -> None:
    """ExportInputError naming the install command when a module of the `export` extra is missing."""
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise _input_error(f"exporting needs {', '.join(missing)} (the 'export' extra): {INSTALL}")


def check_arguments(out: str | os.PathLike, steps: int | None, opset: int, overwrite: bool) -> Path:
    """The cheap checks, before any weights are read. Returns the absolute output path."""
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= MAX_STEPS):
        raise _input_error(f"--steps {steps}: the DNFM sampler is exported with K = 1..{MAX_STEPS} Euler steps")
    if opset not in OPSETS:
        raise _input_error(f"--opset {opset}: use one of {', '.join(map(str, OPSETS))} "
                           "(TensorRT 10 reads <= 19 safely)")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise _input_error(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise _input_error(f"output {out} exists and is not a directory")
    return out


def find_tokenizer_dir(cfg: Any, tokenizer: str | None) -> Path:
    from vlacabin_jax.data.features import TOKENIZER_DIR

    path = Path(tokenizer or cfg.data.get("tokenizer") or TOKENIZER_DIR)
    if not (path / "tokenizer.json").is_file():
        raise _input_error(f"tokenizer {path}: no tokenizer.json there")
    return path


def _check_tokenizer(path: Path, cfg: Any) -> None:
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if size > cfg.model.explain.vocab_size:
        raise _input_error(f"tokenizer {path} has {size} tokens, more than the model's text vocabulary "
                           f"{cfg.model.explain.vocab_size}: it is not the tokenizer this model was trained with")


def write_pytorch(directory: Path, source: Any, steps: int, tokenizer_dir: Path) -> dict:
    """model.safetensors, config.json, action_vocabulary.json and the tokenizer files; returns config."""
    from safetensors.numpy import save_file

    import vlacabin_jax
    from vlacabin_jax.export import convert, torch_model

    config = convert.mirror_config(source.cfg, steps, provenance=dict(source.provenance),
                                   exporter_version=vlacabin_jax.__version__,
                                   action_vocabulary_version=json.loads(source.vocab_json)["version"])
    state = convert.flax_to_torch(source.trainable, source.frozen, config)
    config["io"] = torch_model.io_spec(config)
    save_file(state, str(directory / "model.safetensors"),
              metadata={"format": config["format"], "format_version": str(config["format_version"])})
    (directory / "config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    (directory / "action_vocabulary.json").write_text(source.vocab_json)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, directory / name)
    return config


def export(checkpoint: str | os.PathLike | None = None, out: str | os.PathLike = "exported", *,
           config: Any | None = None, random_init: bool = False, steps: int | None = None, opset: int = 18,
           overwrite: bool = False, trt: bool = False, tokenizer: str | None = None, random_samples: int = 8,
           world_samples: int = 8, latency_runs: int = 50, max_batch: int = 8, source: Any | None = None,
           reference: Any | None = None, log=print) -> dict:
    """Export and verify; see the module docstring (and `tools/export.py` for the command line).

    Args:
      checkpoint: `<workdir>/checkpoints` or one step directory (unless `random_init` or `source`).
      out: the export directory (must not exist unless `overwrite`).
      config: the full config to export (required with `random_init`; with a checkpoint it must be
        the checkpoint's model, else the checkpoint's own config is used).
      steps: the sampler's K (1..8; default `model.dnfm.sample_steps` of the config).
      opset: ONNX opset (17, 18 or 19). trt: also write trt_report.json.
      tokenizer: tokenizer directory (default `data.tokenizer`, else the packaged one).
      random_samples, world_samples: verification inputs (random edge cases, synthetic-world samples).
      latency_runs: ORT CPU batch-1 runs for P50/P95 (0: skip). max_batch: trtexec --maxShapes batch.
      source: an `ExportSource` to export instead of reading a checkpoint (tests, notebooks).
      reference: a `verify.JaxReference` for `source` to reuse (saves compiling it again).
      log: where progress lines go.
    Returns:
      the report (also written to `<out>/export_report.json`).
    Raises:
      ExportInputError for unusable inputs, VerificationError when the outputs disagree; in both
      cases nothing is left at `out` or beside it.
    """
    from vlacabin_jax.export import source as source_lib

    out = check_arguments(out, steps, opset, overwrite)
    if source is None:
        if random_init:
            if config is None:
                raise _input_error("--random-init needs --config")
            source = source_lib.from_random_init(config)
        elif checkpoint is None:
            raise _input_error("give --checkpoint (or --random-init with --config)")
        else:
            source = source_lib.from_checkpoint(checkpoint, config)
    source_lib.check_exportable(source.cfg)  # a `source` passed in has not been checked yet
    k = int(source.cfg.model.dnfm.sample_steps if steps is None else steps)
    check_arguments(out, k, opset, overwrite)
    tokenizer_dir = find_tokenizer_dir(source.cfg, tokenizer)
    _check_tokenizer(tokenizer_dir, source.cfg)

    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        report = _export_into(work, source, k, opset, trt, tokenizer_dir, random_samples, world_samples,
                              latency_runs, max_batch, reference, log)
        if not report["verification"]["passed"]:
            from vlacabin_jax.export.verify import VerificationError, summary_lines

            error = VerificationError("export disagrees with JAX: " + "; ".join(report["verification"]["failures"][:3]))
            error.report = report
            error.lines = summary_lines(report["verification"])
            raise error
        report["files"] = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
        report["out"] = str(out)
        (work / "export_report.json").write_text(json.dumps(report, indent=1))
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for p in reversed(created):  # parents this call created, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return report


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished directory to `out`; an old `out` (--overwrite) goes only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_into(work: Path, source: Any, steps: int, opset: int, trt: bool, tokenizer_dir: Path,
                 random_samples: int, world_samples: int, latency_runs: int, max_batch: int,
                 reference: Any, log) -> dict:
    import torch

    from vlacabin_jax.export import onnx_export, torch_model, trt_report, verify

    log(f"export: {source.provenance.get('origin')} (variant {source.cfg.variant}, K={steps}) -> {work.name}")
    config = write_pytorch(work, source, steps, tokenizer_dir)
    mirror = torch_model.load_mirror(work)  # the files as the car will read them
    if reference is None:
        reference = verify.JaxReference(source.cfg, source.trainable, source.frozen, steps)
    if reference.steps != steps:
        raise ValueError(f"the JAX reference samples with K={reference.steps}, the export with K={steps}")
    inputs = verify.verification_inputs(source.cfg, random_samples, world_samples)
    expected = reference(inputs)
    # The PyTorch mirror first: a conversion error shows there, before minutes of ONNX work.
    result = verify.verify(reference, mirror, {}, inputs, latency_runs=0, reference_outputs=expected)
    onnx_info: dict = {}
    if result["passed"]:
        onnx_files = {}
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            model = mirror if dtype == torch.float32 else torch_model.load_mirror(work, dtype)
            info = onnx_export.export_onnx(model, work / f"{ONNX_STEM}.{precision}.onnx", opset=opset)
            declared = {k: v["shape"] for k, v in {**config["io"]["inputs"], **config["io"]["outputs"]}.items()}
            got = {**info.inputs, **info.outputs}
            if got != declared:
                raise onnx_export.OnnxExportError(f"{Path(info.path).name}: I/O shapes {got} differ from "
                                                  f"config.json's {declared}")
            onnx_files[precision], onnx_info[precision] = info.path, vars(info) | {"path": Path(info.path).name}
            log(f"  {Path(info.path).name}: opset {info.opset}, {sum(info.ops.values())} nodes, "
                f"{info.bytes / 1e6:.1f} MB{' (external data)' if info.external_data else ''}")
        result = verify.verify(reference, mirror, onnx_files, inputs, latency_runs=latency_runs,
                               reference_outputs=expected)
    for line in verify.summary_lines(result):
        log("  " + line)
    report = {"format": "vlacabin.export_report", "variant": source.cfg.variant, "steps": steps, "opset": opset,
              "provenance": config["provenance"], "io": config["io"], "onnx": onnx_info,
              "verification": result, "latency": result["latency"]}
    if trt and result["passed"]:
        tr = trt_report.trt_report(onnx_files["fp32"], onnx_files["fp16"], max_batch=max_batch)
        (work / "trt_report.json").write_text(json.dumps(tr, indent=1))
        for line in trt_report.report_lines(tr):
            log("  " + line)
        report["trt"] = {"native": tr["native"], "flags": tr["flags"], "trtexec": tr["trtexec"]}
    return report
