"""`python -m launch.recipe`: the staged commands, each stage starting from the previous one."""

import pytest

from launch import recipe


def test_dry_run_chains_the_stages_through_init_from(tmp_path, capsys):
    assert recipe.main(["--workdir", str(tmp_path), "--steps", "4,5,6", "--dry-run", "--config.mesh.data=1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[recipe] ")]
    names = [line.split(":")[0].removeprefix("[recipe] ") for line in lines[:-1]]
    assert names == ["pretrain", "sft", "pairs", "align", "evaluate", "export"]
    text = dict(zip(names, lines))
    assert f"--config.train.init_from={tmp_path}/pretrain/checkpoints" in text["sft"]
    assert f"--config.train.init_from={tmp_path}/sft/checkpoints" in text["align"]
    assert f"--config.data.preference_dir={tmp_path}/pairs" in text["align"]
    assert "--config.train.steps=6" in text["align"] and "--config.mesh.data=1" in text["pretrain"]
    assert f"--checkpoint {tmp_path}/sft/checkpoints" in text["pairs"]
    assert "--rejected-for=violation,over_trigger" in text["pairs"]
    assert "--config.data.mixture=preference_sim=1,vla=3" in text["align"]
    assert f"--checkpoint {tmp_path}/align/checkpoints" in text["export"]


def test_done_steps_are_skipped_and_bad_arguments_refused(tmp_path, capsys):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "manifest.json").write_text("{}")
    recipe.main(["--workdir", str(tmp_path), "--dry-run", "--no-export"])
    out = capsys.readouterr().out
    assert "pairs: " in out and "exists, skipped" in out and "export" not in out
    with pytest.raises(SystemExit):
        recipe.main(["--workdir", str(tmp_path), "--steps", "1,2"])
    with pytest.raises(SystemExit):
        recipe.main(["--workdir", str(tmp_path), "--lr=3"])
