"""End to end: a trained checkpoint → export (`vlacabin_jax.export.bundle`) → JAX vs PyTorch vs ONNX Runtime agree.

One export of the tiny config (from the session's trained checkpoint) is shared by the tests of
this module; its verification report is the main evidence, and the tests below re-check the files
from the outside (a JAX-free process loads the PyTorch mirror; the ONNX files pass the checker).
tiny's DNFM has one position per device setting (`model.dnfm.layout = "per_setting"`), so this is
also that layout's end-to-end test: 43 DNFM positions, logits masked to each setting's values
(the forbidden ones exact in every runtime), actions decoded from the per-setting argmax.
"""
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from vlacabin_jax.export.bundle import export
from vlacabin_jax.export import onnx_export, torch_model, verify
from vlacabin_jax.model import setting_layout


@pytest.fixture(scope="module")
def tiny_export(tiny_source, tiny_reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "exported"
    report = export(out=out, source=tiny_source, reference=tiny_reference, steps=4, trt=True, latency_runs=20,
                    log=lambda line: None)
    return out, report


def test_report_passes_with_stated_tolerances(tiny_export):
    out, report = tiny_export
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["verification"]["passed"] and report["verification"]["passed"], report["verification"]["failures"]
    checks = saved["verification"]["checks"]
    assert saved["verification"]["samples"]["batch"] == 16  # 8 random edge cases + 8 synthetic-world samples
    for name, check in checks.items():
        if name == "jax_self_consistency":
            continue
        outs = check["outputs"]
        fp32 = "fp16" not in name
        for key in verify.FLOAT_OUTPUTS:
            assert outs[key]["max_abs"] <= outs[key]["atol"], (name, key, outs[key])
        for key in verify.TOKEN_OUTPUTS:
            assert outs[key]["agreement"] == 1.0 if fp32 else outs[key]["agreement"] >= 0.99, (name, key)
        if fp32:
            assert outs["z0"]["rel"] <= 1e-5 and outs["velocities"]["rel"] <= 1e-5
        logits = outs["action_logits"]
        assert logits["forbidden_exact"] and logits["forbidden"] > 0 and logits["max_ref"] < 1e3, (name, logits)
    assert checks["jax_self_consistency"]["pass"]  # decode_actions of JAX's logits is infer's actions
    # Trained weights: the sampler really moves (a fresh init has zero velocity).
    assert checks["torch_fp32_batch16"]["outputs"]["velocities"]["max_ref"] > 1e-2
    assert {"onnx_fp32_batch1_sample0", "onnx_fp16_batch1_sample1", "onnx_fp16_batch16"} <= set(checks)
    for precision in ("fp32", "fp16"):
        latency = saved["latency"][precision]
        assert latency["batch"] == 1 and 0 < latency["p50_ms"] <= latency["p95_ms"]


def test_exported_files(tiny_export):
    out, report = tiny_export
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "action_vocabulary.json", "tokenizer.json", "vla_cabin.fp32.onnx",
            "vla_cabin.fp16.onnx", "export_report.json", "trt_report.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 4 and config["provenance"]["step"] == 20
    # The DNFM spans one position per device setting (tiny's per-setting layout); the answer is 8 ids.
    assert config["format_version"] == torch_model.FORMAT_VERSION and config["model"]["dnfm"]["layout"] == "per_setting"
    assert config["setting_layout"]["paths"] == list(setting_layout.layout_tables().paths)
    io = config["io"]
    assert io["outputs"]["velocities"]["shape"] == ["batch", 4, 43, 32] and io["outputs"]["z0"]["shape"] == ["batch", 43, 32]
    assert io["outputs"]["action_logits"]["shape"] == ["batch", 43, 181]
    assert io["outputs"]["action_tokens"]["shape"] == ["batch", 8] and io["inputs"]["history_actions"]["shape"] == ["batch", 8]
    for precision in ("fp32", "fp16"):
        path = out / f"vla_cabin.{precision}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"Loop", "If", "Scan"} and "LayerNormalization" in ops
        assert model.opset_import[0].version == 18
        assert all(v.type.tensor_type.shape.dim[0].dim_param == "batch" for v in model.graph.input)
    trt = json.loads((out / "trt_report.json").read_text())
    assert trt["native"] and not trt["flags"]  # the per-setting decode included: every op native in TensorRT 10
    assert set(trt["trtexec"]) == {"fp16", "fp16_from_fp32", "bf16", "fp32"}
    assert "--stronglyTyped" in trt["trtexec"]["fp16"] and "--bf16" in trt["trtexec"]["bf16"]
    assert "--maxShapes=text_tokens:8x24" in trt["trtexec"]["fp32"]


LOAD_WITHOUT_JAX = r"""
import sys, json
import numpy as np
for name in ("jax", "jaxlib", "flax", "optax", "orbax"):
    sys.modules[name] = None  # any import of these now fails
import torch
from vlacabin_jax.export.torch_model import INPUT_NAMES, load_mirror
model = load_mirror(sys.argv[1])
data = np.load(sys.argv[2])
with torch.no_grad():
    out = model(**{k: torch.from_numpy(data[k]) for k in INPUT_NAMES})
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
"""


def test_mirror_loads_and_runs_without_jax(tiny_export, tiny_reference, tiny_source, tmp_path):
    out, _ = tiny_export
    inputs = verify.verification_inputs(tiny_source.cfg, 8, 8, seed=3)  # the verified batch size: compiled once
    assert (inputs["history_actions"][8:, 0] > 2).any()  # a world follow-up with an executed action log
    np.savez(tmp_path / "in.npz", **inputs)
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_JAX, str(out), str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], check=True, timeout=300)
    got = dict(np.load(tmp_path / "out.npz"))
    ref = tiny_reference(inputs)
    result = verify.compare(ref, got, verify.FP32)
    assert result["pass"], result
    # The mirror's actions are its own per-setting argmax put in cabin order (and JAX's, above).
    settings = np.argmax(got["action_logits"], -1).astype(np.int32)
    want = setting_layout.to_sequence(jnp.asarray(settings), 8, setting_layout.layout_tables())
    assert np.array_equal(got["action_tokens"], np.asarray(want))


def test_external_data_when_large(tiny_export, tmp_path, monkeypatch):
    """Over the 2 GB protobuf limit the weights go to one `.data` file; the graph still checks and runs."""
    out, _ = tiny_export
    mirror = torch_model.load_mirror(out)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    info = onnx_export.export_onnx(mirror, tmp_path / "m.onnx", opset=17)
    assert info.external_data and (tmp_path / "m.onnx.data").is_file() and info.opset == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    inputs = verify.random_batch(_cfg(out), 3, seed=5)
    ort = verify.run_ort(onnx_export.ort_session(info.path), inputs)
    reference = verify.run_torch(mirror, inputs)
    assert verify.compare(reference, ort, verify.FP32)["pass"]


def _cfg(out):
    """The exported config as an attribute tree with `data`/`model` (what `random_batch` reads)."""
    import ml_collections

    config = json.loads((out / "config.json").read_text())
    return ml_collections.ConfigDict({"model": config["model"], "data": config["data"]})


def test_small_checkpoint_converts_and_matches_jax(tmp_path_factory):
    """The `small` config: a checkpoint in the trainer's format (fresh params with noise, see
    `train_and_save`) becomes PyTorch files whose mirror matches JAX. The ONNX path is shape-generic
    and proven on tiny above; at small's size it would cost minutes of CPU for no new code path."""
    from tests.export.conftest import trained_checkpoint
    from vlacabin_jax.export.bundle import find_tokenizer_dir, write_pytorch
    from vlacabin_jax.export.source import from_checkpoint

    source = from_checkpoint(trained_checkpoint(tmp_path_factory, "small", steps=0))
    assert source.cfg.variant == "small"
    out = tmp_path_factory.mktemp("small")
    config = write_pytorch(out, source, 2, find_tokenizer_dir(source.cfg, None))
    assert config["steps"] == 2 and (out / "model.safetensors").is_file()
    mirror = torch_model.load_mirror(out)
    inputs = verify.verification_inputs(source.cfg, 2, 2)  # 2 random edge cases + 2 world samples
    reference = verify.JaxReference(source.cfg, source.trainable, source.frozen, steps=2)(inputs)
    result = verify.compare(reference, verify.run_torch(mirror, inputs), verify.FP32)
    assert result["pass"], result
    assert all(result["outputs"][k]["agreement"] == 1.0 for k in verify.TOKEN_OUTPUTS)
    assert result["outputs"]["velocities"]["max_ref"] > 1e-2  # the noised params make the sampler move
    print(f"\nsmall mirror vs JAX: {json.dumps({k: v.get('max_abs') for k, v in result['outputs'].items()})}")
