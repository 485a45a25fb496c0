"""The house: data flows one way and so do the imports. A module never imports a layer above its own, and the
kernels import only torch, triton and the standard library."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top; a module may import its own layer and the ones below.
LAYERS = [
    ["fasttrain.ladder"],
    ["fasttrain.config"],
    ["fasttrain.model", "fasttrain.kernels", "fasttrain.device", "fasttrain.optim"],
    ["fasttrain.data"],
    ["fasttrain.measure", "fasttrain.checkpoint"],
    ["fasttrain.train"],
    ["fasttrain.eval"],
    ["fasttrain.sweep", "fasttrain.interop"],
    ["fasttrain.cli"],
]


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def module_files():
    for folder, package in ((os.path.join(ROOT, "fasttrain"), "fasttrain"), (os.path.join(ROOT, "kernels"), "fasttrain.kernels")):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), folder)[:-3].replace(os.sep, ".")
                    module = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    yield module, os.path.join(dirpath, name)


def imports(path: str, module: str):
    """Every module imported anywhere in the file (top level or inside functions), absolute names."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for module, path in module_files():
        mine = layer_of(module)
        if mine is None:
            continue
        for name in imports(path, module):
            theirs = layer_of(name)
            if theirs is not None and theirs > mine:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong
    # The check sees what it should: every module is in a layer.
    assert all(layer_of(m) is not None for m, _ in module_files() if m != "fasttrain")


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", "fasttrain.kernels"} | set(sys.stdlib_module_names)
    for module, path in module_files():
        if module.startswith("fasttrain.kernels"):
            for name in imports(path, module):
                root = name.split(".")[0]
                assert root in allowed or name.startswith("fasttrain.kernels"), f"{module} imports {name}"


@pytest.mark.parametrize("source, module, expected", [
    ("from fasttrain.eval import run", "fasttrain.train.engine", "fasttrain.eval"),
    ("from ..eval import run", "fasttrain.train.engine", "fasttrain.eval"),
])
def test_the_import_reader_sees_absolute_and_relative_imports(tmp_path, source, module, expected):
    path = tmp_path / "m.py"
    path.write_text(f"def f():\n    {source}\n")
    assert list(imports(str(path), module)) == [expected]
