"""Every `python -m …` command that the README and docs/ show still names a real entry point, a
flag that entry point takes, and a config spec and overrides that load.

The commands are read from the Markdown as written (code blocks and inline code, `\\` line
continuations joined); `[…]` marks optional arguments and is read too. Each distinct module's
`--help` is asked once, and every `--flag` a documented command passes must be in it; each
`--config path:variant` with its `--config.a.b=value` overrides must pass `load_config`. This is a
check that the documentation cannot rot, not a run of the commands (their behaviour has its own
tests: the suite would not fit its budget running each one).
"""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlacabin_jax.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_COMMAND = re.compile(r"python -m ([a-z_][a-z0-9_.]*[a-z0-9_])([^`|\n;]*)")
# Modules documented as commands that are not this project's entry points.
_FOREIGN = {"pip", "pytest", "venv"}
# launch.local's own flags; every other flag goes to `python -m launch`.
_LOCAL_FLAGS = {"--processes", "--devices"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """[(page name, module, argument tokens)] of every `python -m` command on the pages."""
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for match in _COMMAND.finditer(text):
            module, rest = match.group(1), match.group(2)
            rest = rest.split(" #")[0]  # a shell comment after the command
            rest = rest.replace("[", " ").replace("]", " ").replace("...", " ").replace("…", " ")
            found.append((page.name, module, shlex.split(rest.split(" && ")[0].split(")")[0])))
    return found


COMMANDS = [c for c in documented_commands() if c[1] not in _FOREIGN]


@functools.cache
def help_text(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    text = out.stdout + out.stderr
    # absl (python -m launch) exits 1 after printing its help; argparse exits 0.
    assert out.returncode in (0, 1) and "Traceback" not in text and "--" in text, \
        f"python -m {module} --help failed: {text[-1500:]}"
    return text


def takes(module: str, flag: str) -> bool:
    """Whether `python -m module --help` names `flag` as a whole word (not a prefix of another)."""
    return re.search(re.escape(flag) + r"(?![\w-])", help_text(module)) is not None


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and not a.startswith("--config.")]


def test_the_pages_show_the_entry_points():
    modules = {m for _, m, _ in COMMANDS}
    assert {"launch", "launch.local", "launch.recipe", "tools.evaluate", "tools.export", "tools.mesh_bench",
            "tools.quality_ladder", "tools.build_dataset"} <= modules, modules


@pytest.mark.parametrize("page,module,args", COMMANDS, ids=[f"{p}:{m}:{i}" for i, (p, m, _) in enumerate(COMMANDS)])
def test_documented_command_parses(page, module, args, monkeypatch):
    monkeypatch.chdir(REPO)  # the pages' paths are relative to the repository root
    if module == "launch.local":
        own = [f for f in _flags(args) if f in _LOCAL_FLAGS]
        missing = [f for f in own if not takes("launch.local", f)]
        missing += [f for f in _flags(args) if f not in _LOCAL_FLAGS and not takes("launch", f)]
    else:
        missing = [f for f in _flags(args) if not takes(module, f)]
    assert not missing, f"{page}: `python -m {module}` does not take {missing}"

    overrides = [a for a in args if a.startswith("--config.")]
    spec = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), None)
    spec = spec or next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if spec and not re.fullmatch(r"[\w/.-]+\.py:\w+", spec):
        pytest.fail(f"{page}: `python -m {module}` has config spec {spec!r}; write path.py:variant")
    if spec or overrides:
        # W/… and runs/… name workdirs the command would create; the config itself must load.
        cfg = load_config(spec or "configs/vla_cabin.py:tiny", [o for o in overrides if "=" in o])
        assert cfg.model and cfg.train
