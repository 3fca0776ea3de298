"""Export a trained VLA-Cabin to PyTorch (safetensors) and ONNX (fp32 + fp16), verified against JAX.

    python -m tools.export --checkpoint runs/demo/checkpoints --out exported/ [--steps K] [--trt]
    python -m tools.export --checkpoint runs/demo/checkpoints/400 --out exported/ --overwrite
    python -m tools.export --random-init --config configs/vla_cabin.py:tiny --out /tmp/smoke

Writes the PyTorch mirror's weights, ONNX fp32 and fp16, the action vocabulary, the tokenizer and
`export_report.json` into a temporary directory beside `--out`, renamed into place only when every
check passed (the file list: `vlacabin_jax.export.bundle`).

Library use: `vlacabin_jax.export.bundle.export(checkpoint=..., out=..., steps=...)` returns the report.
Needs the `export` extra (`pip install torch==2.13.0 && pip install -e '.[export]'`).
Exit status: 0 exported; 1 verification failed (nothing written); 2 unusable input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from vlacabin_jax.export import bundle
from vlacabin_jax.export.source import ExportInputError


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="<workdir>/checkpoints (newest complete step) or one step directory")
    parser.add_argument("--out", required=True, help="export directory (must not exist unless --overwrite)")
    parser.add_argument("--config", help="configs/vla_cabin.py:VARIANT; with --checkpoint it must match the "
                        "checkpoint's model; --config.a.b=value overrides fields")
    parser.add_argument("--random-init", action="store_true", help="export fresh params (a pipeline smoke test)")
    parser.add_argument("--steps", type=int, help=f"Euler steps K of the DNFM sampler, 1..{bundle.MAX_STEPS} "
                        "(default model.dnfm.sample_steps)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 17..19 (default 18)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--trt", action="store_true", help="write trt_report.json (TensorRT 10 op support, trtexec)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default data.tokenizer, else the packaged one)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the trtexec shape profile")
    parser.add_argument("--latency-runs", type=int, default=50, help="ORT CPU batch-1 runs for P50/P95 (0: skip)")
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    try:
        bundle.check_extra()  # before the imports below: they need torch
    except ExportInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from vlacabin_jax.export.convert import ConversionError
    from vlacabin_jax.export.onnx_export import OnnxExportError
    from vlacabin_jax.export.verify import VerificationError

    try:
        bundle.check_arguments(args.out, args.steps, args.opset, args.overwrite)
        if not (args.checkpoint or args.random_init):
            raise ExportInputError("give --checkpoint DIR (or --random-init with --config)")
        if args.checkpoint and args.random_init:
            raise ExportInputError("give either --checkpoint or --random-init, not both")
        cfg = None
        if args.config:
            from vlacabin_jax.config import ConfigError, load_config

            try:
                cfg = load_config(args.config, overrides)
            except ConfigError as e:
                raise ExportInputError(f"--config: {str(e).removeprefix('--config: ')}") from None
        elif overrides:
            raise ExportInputError("--config.* overrides need --config")
        elif args.random_init:
            raise ExportInputError("--random-init needs --config (e.g. configs/vla_cabin.py:tiny)")
        report = bundle.export(args.checkpoint, args.out, config=cfg, random_init=args.random_init,
                               steps=args.steps, opset=args.opset, overwrite=args.overwrite, trt=args.trt,
                               tokenizer=args.tokenizer, max_batch=args.max_batch, latency_runs=args.latency_runs)
    except ExportInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(json.dumps(getattr(e, "report", {}).get("verification", {}), indent=1))
        for line in getattr(e, "lines", []):
            print(line, file=sys.stderr)
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 1
    except (ConversionError, OnnxExportError) as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 1
    print(f"exported to {report['out']} (report: {report['out']}/export_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
