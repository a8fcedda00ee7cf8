"""Imports point down the layers of shared/DESIGN.md (and docs/ARCHITECTURE.md).

Every module of the package is parsed (not imported) and each of its pyclipq imports (every
imported name, relative or absolute) is checked against the layer table below: a module may import
its own layer or lower ones; only the top layer may import the facade (`import pyclipq`, which
imports every layer); and the rooms of one layer import each other without a cycle. Each check is
shown to fail on an injected violation.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
    "transform": 6,
    "models": 7, "convert": 7, "io": 7,
    "eval": 8, "testbed": 8,
    "data": 9, "distributed": 9, "calibrate": 9, "train": 9, "embed": 9,
    "cli": 10,
}
# Imports that point up on purpose, each with its reason.
ALLOWED_UPWARD = {
}


def _module_exists(parts: list[str]) -> bool:
    base = PACKAGE.joinpath(*parts) if parts else PACKAGE
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[list[str], int]]:
    """(target module path under pyclipq, line) of every pyclipq import in the file: one per
    imported name, relative or absolute. [] is the facade (pyclipq/__init__.py, which imports every
    layer): `import pyclipq`, or a name `from pyclipq import` that is no module of its own."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = (node.module or "").split(".")
                if module[0] != "pyclipq":
                    continue
                base = module[1:]
            else:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            if node.module is not None and base:  # from .x import y: y is a name in x (or a submodule of it)
                found.append((base, node.lineno))
                continue
            for alias in node.names:  # from .. import a, b / from pyclipq import a, b: each name counts
                target = base + [alias.name]
                found.append((target if _module_exists(target) else base, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1:], node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == "pyclipq"]
    return found


TOP_LAYER = max(LAYERS.values())


def test_imports_point_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):  # the facade re-exports every layer's public names
            continue
        assert parts[0] in LAYERS, f"{path}: add its top-level module to LAYERS"
        for target, line in _imports(path):
            if not target:
                if LAYERS[parts[0]] != TOP_LAYER:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports the facade pyclipq (every layer); "
                                 f"only layer {TOP_LAYER} may")
                continue
            if target[0] not in LAYERS:
                continue
            if LAYERS[target[0]] > LAYERS[parts[0]] and (parts[0], target[0]) not in ALLOWED_UPWARD:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target)} (layer "
                             f"{LAYERS[target[0]]} above {parts[0]}'s {LAYERS[parts[0]]})")
    assert not wrong, "\n".join(wrong)


def test_rooms_of_one_layer_import_each_other_one_way():
    """Within a layer, the rooms (models, convert, io; calibrate, train, embed; ...) may import each
    other, but without a cycle: each layer has an order of its own, so no two rooms need each other."""
    edges: dict[str, dict[str, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",) or parts[0] not in LAYERS:
            continue
        for target, line in _imports(path):
            if target and target[0] in LAYERS and target[0] != parts[0] and LAYERS[target[0]] == LAYERS[parts[0]]:
                edges.setdefault(parts[0], {}).setdefault(target[0], f"{path.relative_to(PACKAGE)}:{line}")

    def cycle_from(room, trail):
        for nxt in edges.get(room, {}):
            if nxt in trail:
                return trail[trail.index(nxt):] + [nxt]
            found = cycle_from(nxt, trail + [nxt])
            if found:
                return found
        return None

    for room in sorted(edges):
        cycle = cycle_from(room, [room])
        if cycle:
            where = ", ".join(edges[a][b] for a, b in zip(cycle, cycle[1:]))
            raise AssertionError(f"rooms of layer {LAYERS[room]} import each other in a cycle: "
                                 f"{' -> '.join(cycle)} ({where})")


def test_eval_imports_nothing_else_of_pyclipq():
    """eval stays free of pyclipq imports, so training can report zero-shot accuracy through it."""
    outside = [f"{path.name}:{line} imports {'.'.join(target) or 'pyclipq'}"
               for path in sorted((PACKAGE / "eval").rglob("*.py"))
               for target, line in _imports(path) if not target or target[0] != "eval"]
    assert not outside, outside


# The planner: the one module that asks a config what it selects.
PLANNER = "convert.py"


def _config_reads() -> tuple[list[str], list[str]]:
    """(calls of `.selects(...)` outside the planner and configs, functions in models/ that take a config)."""
    selects, adapters = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "selects"
                    and rel not in (PLANNER, "configs.py")):
                selects.append(f"{rel}:{node.lineno}")
            if rel.startswith("models/") and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                for arg in args:
                    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                    if "config" in arg.arg.lower() or "Config" in annotation:
                        adapters.append(f"{rel}:{node.lineno} {node.name}({arg.arg})")
    return selects, adapters


def test_a_config_goes_down_without_climbing_back():
    """Only the planner asks `config.selects`; adapters (models/) return kinds and names, never see a config."""
    selects, adapters = _config_reads()
    assert not selects, f"config.selects called outside {PLANNER}: {selects}"
    assert not adapters, f"functions in models/ that take a config: {adapters}"


@pytest.mark.parametrize("files,reported", [
    ({"calibrate/bad.py": "def f(config, name):\n    return config.selects(name)\n"},
     "config.selects called outside convert.py: ['calibrate/bad.py:2']"),
    ({"models/bad.py": "def custom_attention(name, module, config):\n    return None\n"},
     "functions in models/ that take a config: ['models/bad.py:1 custom_attention(config)']"),
    ({"models/bad.py": "def target(name, layer: LayerConfig):\n    return None\n"},
     "functions in models/ that take a config: ['models/bad.py:1 target(layer)']"),
])
def test_the_config_route_check_sees_a_violation(tmp_path, monkeypatch, files, reported):
    _fake_package(tmp_path, monkeypatch, files)
    assert reported in _failure(test_a_config_goes_down_without_climbing_back)


def _fake_package(tmp_path, monkeypatch, files: dict[str, str]) -> Path:
    """A package tree of the given files (path -> source) that the checks read instead of pyclipq's."""
    fake = tmp_path / "pyclipq"
    for rel, source in {"formats.py": "", "train/__init__.py": "", "nn/__init__.py": "", **files}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    return fake


def _failure(check) -> str:
    try:
        check()
    except AssertionError as e:
        return str(e)
    raise AssertionError("the check passed on an injected violation")


@pytest.mark.parametrize("source,reported", [
    ("from ..train import qat\n", "nn/bad.py:1 imports train (layer 9 above nn"),
    # every name of a multi-name import, not only the first
    ("from .. import formats, train\n", "nn/bad.py:1 imports train (layer 9 above nn"),
    # absolute imports
    ("from pyclipq import train\n", "nn/bad.py:1 imports train (layer 9 above nn"),
    ("import pyclipq.train.qat\n", "nn/bad.py:1 imports train.qat (layer 9 above nn"),
    # the facade imports every layer
    ("import pyclipq\n", "nn/bad.py:1 imports the facade pyclipq"),
    ("from pyclipq import convert\n", "nn/bad.py:1 imports the facade pyclipq"),
])
def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch, source, reported):
    """The check can fail: a module that imports from a higher layer, however it is written, is reported."""
    _fake_package(tmp_path, monkeypatch, {"nn/bad.py": source})
    assert reported in _failure(test_imports_point_down_the_layers)


def test_the_room_check_sees_a_cycle_within_a_layer(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, {"io.py": "from .models import base\n", "models/__init__.py": "",
                                          "models/base.py": "from .. import io\n"})
    message = _failure(test_rooms_of_one_layer_import_each_other_one_way)
    assert "rooms of layer 7 import each other in a cycle: io -> models -> io (io.py:1, models/base.py:1)" in message


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
