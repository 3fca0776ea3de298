"""Convert local Hugging Face anchor checkpoints into one flat safetensors file of Flax params.

    python -m tools.import_hf --vit DIR --lm DIR --out OUT.safetensors [--no-scan] [--dtype bfloat16]

Either or both of --vit (SigLIP vision) and --lm (Qwen2/Llama). Keys in the output are the Flax
param paths joined by "/", under `vit/` and `lm/` (the VLACabin param groups); the derived config
fields are stored as JSON in the file's metadata. All the work is in `vlacabin_jax.hf_import`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from vlacabin_jax import hf_import


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 on an expected error)."""
    parser = argparse.ArgumentParser(prog="python -m tools.import_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit", help="SigLIP vision checkpoint directory (siglip_vision_model or siglip)")
    parser.add_argument("--lm", help="Qwen2/Llama checkpoint directory")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--no-scan", dest="scan", action="store_false",
                        help="unrolled layers (layers_0..) instead of stacked (model.scan_layers=False)")
    parser.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                        help="storage dtype of the written params (default: as in the checkpoint)")
    args = parser.parse_args(argv)
    if not (args.vit or args.lm):
        parser.error("give --vit and/or --lm")
    dtype = None if args.dtype == "keep" else args.dtype
    if dtype == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16 of its own

        dtype = ml_dtypes.bfloat16

    flat, metadata = {}, {"scan": json.dumps(args.scan)}
    try:
        for kind, directory in (("vit", args.vit), ("lm", args.lm)):
            if not directory:
                continue
            result = hf_import.convert_checkpoint(directory, kind, None, scan=args.scan, dtype=dtype)
            params = traverse_util.flatten_dict(result.params, sep="/")
            count = sum(int(np.prod(a.shape)) for a in params.values())
            print(f"{kind}: {directory}")
            print(f"  config: {json.dumps(result.config)}")
            print(f"  params: {count:,} in {len(params)} arrays; ignored {len(result.ignored)} tensors"
                  + (f" ({', '.join(result.ignored[:4])}{' ...' if len(result.ignored) > 4 else ''})"
                     if result.ignored else ""))
            flat.update({f"{kind}/{k}": np.ascontiguousarray(a) for k, a in params.items()})
            metadata[f"{kind}_config"] = json.dumps(result.config)
        save_file(flat, args.out, metadata=metadata)
    except (hf_import.HFImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
