"""Imports point down the layers of shared/DESIGN.md (and docs/ARCHITECTURE.md).

Every module of the package is parsed (not imported) and each of its pyclipq imports is
checked against the layer table below: a module may import its own layer or lower ones.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pyclipq

PACKAGE = Path(pyclipq.__file__).resolve().parent

# first path component under pyclipq/ -> layer (higher imports lower, never the reverse)
LAYERS = {
    "_build": 0, "_C": 0, "_version": 0,
    "formats": 1,
    "primitives": 2,
    "ops": 3,
    "configs": 4,
    "nn": 5,
    "models": 6, "convert": 6, "io": 6,
    "eval": 7, "testbed": 7,
    "calibrate": 8, "train": 8, "embed": 8,
    "cli": 9,
}
# Imports that point up on purpose, each with its reason.
ALLOWED_UPWARD = {
}


def _imports(path: Path) -> list[tuple[list[str], int]]:
    """(target module path under pyclipq, line) of every pyclipq import in the file."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("pyclipq."):
                    continue
                target = node.module.split(".")[1:]
            else:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [node.names[0].name])
            found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1:], node.lineno) for alias in node.names
                      if alias.name.startswith("pyclipq.")]
    return found


def test_imports_point_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):  # the facade re-exports every layer's public names
            continue
        assert parts[0] in LAYERS, f"{path}: add its top-level module to LAYERS"
        for target, line in _imports(path):
            if not target or target[0] not in LAYERS:
                continue
            if LAYERS[target[0]] > LAYERS[parts[0]] and (parts[0], target[0]) not in ALLOWED_UPWARD:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target)} (layer "
                             f"{LAYERS[target[0]]} above {parts[0]}'s {LAYERS[parts[0]]})")
    assert not wrong, "\n".join(wrong)


def test_eval_imports_nothing_else_of_pyclipq():
    """eval stays free of pyclipq imports, so training can report zero-shot accuracy through it."""
    outside = [f"{path.name}:{line} imports {'.'.join(target)}"
               for path in sorted((PACKAGE / "eval").rglob("*.py"))
               for target, line in _imports(path) if target and target[0] != "eval"]
    assert not outside, outside


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a module that imports from a higher layer is reported."""
    fake = tmp_path / "pyclipq"
    (fake / "nn").mkdir(parents=True)
    (fake / "nn" / "bad.py").write_text("from ..train import qat\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_imports_point_down_the_layers()
    except AssertionError as e:
        assert "nn/bad.py:1 imports train (layer 8 above nn" in str(e)
    else:
        raise AssertionError("an upward import went unseen")


# Packages that pyclipq's core install does not bring (extras), imported where first needed so
# the library works without them. Anything else is imported at the top of its module.
OPTIONAL_DEPENDENCIES = {"triton", "open_clip", "transformers", "clip", "torchvision", "PIL", "matplotlib",
                         "onnxruntime", "openvino", "nncf", "webdataset"}
# Function-local pyclipq imports kept on purpose, each with its reason.
ALLOWED_LOCAL = {
    ("ops/__init__.py", "triton"),  # pyclipq.ops.triton needs the optional triton
}


def test_function_local_imports_are_only_for_optional_dependencies():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    names = [(alias.name.split(".")[0], alias.name) for alias in sub.names]
                elif isinstance(sub, ast.ImportFrom):
                    root = "." if sub.level else (sub.module or "").split(".")[0]
                    names = [(root, sub.module or sub.names[0].name)]
                else:
                    continue
                for root, full in names:
                    if root in OPTIONAL_DEPENDENCIES or (rel, full.split(".")[0]) in ALLOWED_LOCAL:
                        continue
                    wrong.append(f"{rel}:{sub.lineno} imports {full} inside {node.name}()")
    assert not wrong, "move these to the top of the module:\n" + "\n".join(wrong)
