"""Bad inputs to `tools.export`: one clear error line, a non-zero exit, nothing left behind."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tools import export as export_tool
from vlacabin_jax.export import bundle, convert
from vlacabin_jax.export.verify import VerificationError
from vlacabin_jax.train.checkpoint import CHECKSUMS


def run_cli(args, capsys):
    code = export_tool.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def leftovers(directory, before):
    return sorted(p.name for p in directory.iterdir() if p.name not in before)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    step = next(p for p in dst.iterdir() if p.name.isdigit())
    return step


def test_missing_checkpoint(tmp_path, capsys):
    code, err = run_cli(["--checkpoint", tmp_path / "nope", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == [f"error: checkpoint {tmp_path / 'nope'} does not exist"]
    assert leftovers(tmp_path, set()) == []


def test_existing_output_needs_overwrite(tmp_path, capsys, tiny_checkpoint):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old export")
    code, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == [f"error: output {tmp_path / 'out'} already exists; pass --overwrite to replace it"]
    assert leftovers(tmp_path, set()) == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "old export"


@pytest.mark.parametrize("steps", [0, 9])
def test_unsupported_steps(tmp_path, capsys, steps):
    code, err = run_cli(["--checkpoint", tmp_path, "--out", tmp_path / "out", "--steps", steps], capsys)
    assert code == 2 and err == [f"error: --steps {steps}: the DNFM sampler is exported with K = 1..8 Euler steps"]
    assert leftovers(tmp_path, set()) == []


def test_checkpoint_of_another_config(tmp_path, capsys, tiny_checkpoint):
    code, err = run_cli(["--checkpoint", tiny_checkpoint, "--config", "configs/vla_cabin.py:small",
                         "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: checkpoint is from another config (tiny): model.") and "--config" in err[0]
    assert leftovers(tmp_path, set()) == []


def test_incomplete_checkpoint(tmp_path, capsys, tiny_checkpoint):
    step = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (step / "_CHECKPOINT_METADATA").unlink()
    before = {p.name for p in tmp_path.iterdir()}
    code, err = run_cli(["--checkpoint", step, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == [f"error: checkpoint {step} is incomplete: missing _CHECKPOINT_METADATA "
                                 "(save never finished)"]
    code, err = run_cli(["--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == [f"error: no complete checkpoint in {tmp_path / 'ckpt'} (incomplete steps: "
                                 f"[{step.name}]); pass <workdir>/checkpoints of a run that saved at least once"]
    assert leftovers(tmp_path, before) == []


def test_checkpoint_with_missing_params(tmp_path, capsys, tiny_checkpoint):
    step = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    shutil.rmtree(step / "state")
    (step / "state").mkdir()
    (step / "state" / "junk").write_text("x")
    code, err = run_cli(["--checkpoint", step, "--out", tmp_path / "out"], capsys)
    # The trainer's checksums catch the change first ...
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: checkpoint {step} is damaged: file ")
    # ... and without them (a checkpoint from before checksums) the restore itself refuses.
    (step / CHECKSUMS).unlink()
    code, err = run_cli(["--checkpoint", step, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: checkpoint {step}: params do not restore")


def test_other_action_vocabulary_version(tmp_path, capsys, tiny_checkpoint):
    step = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    meta_file = next(f for f in (step / "metadata").iterdir() if f.is_file() and not f.name.startswith("_"))
    meta = json.loads(meta_file.read_text())
    meta["action_vocabulary"]["version"] = "0.9.0"
    meta["action_vocabulary"]["tokens"] = meta["action_vocabulary"]["tokens"][:-1]
    meta_file.write_text(json.dumps(meta))
    (step / CHECKSUMS).unlink()  # a checkpoint whose metadata was written so (not damaged later)
    code, err = run_cli(["--checkpoint", step, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1
    assert "action vocabulary version 0.9.0 (180 tokens) differs from this code's 1.0.0 (181 tokens)" in err[0]
    assert not (tmp_path / "out").exists()


def test_autoregressive_action_head_is_refused(tmp_path, capsys):
    """The quality ladder's autoregressive head has no mirror: one line naming the field, before any init."""
    code, err = run_cli(["--random-init", "--config", "configs/vla_cabin.py:tiny",
                         "--config.model.action_head=autoregressive", "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: model.action_head = 'autoregressive' is not exported")
    assert leftovers(tmp_path, set()) == []


def test_cli_process_exit_status_and_one_line(tmp_path):
    """The real command line (a fresh process): exit status 2 and exactly one stderr line."""
    proc = subprocess.run([sys.executable, "-m", "tools.export", "--checkpoint", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out"), "--opset", "21"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --opset 21: use one of 17, 18, 19 (TensorRT 10 reads <= 19 safely)"]
    assert not (tmp_path / "out").exists()


def test_missing_export_extra_is_one_line_with_the_install_command(tmp_path):
    """Without torch (only the base install): one line naming the extra, exit status 2, no traceback."""
    # `sys.modules[name] = None` makes the module unfindable, as if it was never installed.
    code = ("import sys; sys.modules['torch'] = None; from tools.export import main; "
            f"sys.exit(main(['--random-init', '--config', 'configs/vla_cabin.py:tiny', '--out', {str(tmp_path / 'out')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: exporting needs torch (the 'export' extra): pip install torch==2.13.0 && pip install -e '.[export]'"]
    assert not (tmp_path / "out").exists()


def test_failed_verification_writes_nothing_and_keeps_the_old_export(tmp_path, monkeypatch, tiny_source,
                                                                      tiny_reference):
    """A conversion bug (one transposed square weight) must be caught by the parity check: the
    export raises, no temp directory stays, and an existing export under --overwrite is untouched."""
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous, good export")
    real = convert.flax_to_torch

    def buggy(*args, **kwargs):
        state = real(*args, **kwargs)
        name = "dnfm.blocks.layers.0.attn.query.weight"
        return dict(state, **{name: np.ascontiguousarray(state[name].T)})

    monkeypatch.setattr(convert, "flax_to_torch", buggy)
    with pytest.raises(VerificationError) as info:
        bundle.export(out=out, source=tiny_source, reference=tiny_reference, steps=4, overwrite=True,
                      latency_runs=0, log=lambda line: None)
    assert "torch_fp32" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the previous, good export"
