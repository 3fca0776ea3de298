"""No input file can execute code: the package, tools and launchers never deserialize with pickle
(or anything built on it) and never evaluate text. Checked on the syntax tree of every source file,
so a new `np.load(path)` without `allow_pickle=False` fails here."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("vlacabin_jax", "tools", "launch", "configs") for p in (REPO / d).rglob("*.py"))
# Modules whose loaders run code from the data they read.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems(tree: ast.AST) -> list[str]:
    """Unsafe deserialization or evaluation in one module's syntax tree, as `line: what`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if isinstance(func, ast.Name) and name in ("eval", "exec"):
            found.append(f"{node.lineno}: calls {name}()")
        elif name == "load" and owner in ("np", "numpy") and not _is_const(_keyword(node, "allow_pickle"), False):
            found.append(f"{node.lineno}: np.load without allow_pickle=False")
        elif name == "load" and owner == "torch" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name in ("load", "load_all") and owner == "yaml" and _keyword(node, "Loader") is None:
            found.append(f"{node.lineno}: yaml.{name} without a safe Loader")
    return found


def test_the_checker_catches_each_unsafe_pattern():
    code = ("import pickle\nfrom joblib import load\nimport numpy as np\nimport torch\n"
            "np.load('x.npy')\nnp.load('x.npy', allow_pickle=False)\ntorch.load('m.pt')\n"
            "torch.load('m.pt', weights_only=True)\neval('1')\nyaml.load(s)\n")
    assert problems(ast.parse(code)) == [
        "1: imports pickle", "2: imports joblib", "5: np.load without allow_pickle=False",
        "7: torch.load without weights_only=True", "9: calls eval()", "10: yaml.load without a safe Loader"]


def test_source_never_runs_code_from_files():
    assert len(SOURCES) > 50
    found = {str(p.relative_to(REPO)): problems(ast.parse(p.read_text(), str(p))) for p in SOURCES}
    assert {k: v for k, v in found.items() if v} == {}
