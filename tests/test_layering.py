"""The import structure, read from the source (nothing is imported): one-way layers, no private names used
across modules, imports at the top of modules except the optional heavy stacks.

Layers, lowest first: dit_jax.utils -> dit_jax.data -> dit_jax (the core) -> convert -> dit_jax.cli. A package
may import from its own layer and the ones below it; `convert.reference` (the PyTorch re-statements) sits
beside convert. A cycle between packages, torch or convert imported by the core, or `from m import _name`
/ `m._name` across modules fails the test with the file and line.
"""
import ast
import os
from collections import defaultdict

import pytest

from conftest import ROOT

PACKAGES = ("dit_jax", "convert")
# Optional heavy stacks that may be imported inside a function (with a one-line reason on that line).
LAZY_ALLOWED = ("torch", "tensorflow", "tensorflow_datasets", "sklearn", "jax_plugins", "libtpu", "dit_jax.data.tfds",
                "jax.experimental.pallas.ops.tpu")
CORE_FORBIDDEN = ("torch", "convert", "diffusers", "torchvision")


def module_files():
    """{dotted module name: path} for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = module_files()


def package_of(module: str) -> str:
    path = MODULES.get(module, "")
    return module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(module: str):
    """[(imported module, names taken from it or None, line, nested?, source line)] of one module."""
    path = MODULES[module]
    src = open(path).read()
    lines = src.splitlines()
    tree = ast.parse(src)
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    nested.add(id(sub))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, None, node.lineno, id(node) in nested, lines[node.lineno - 1]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = package_of(module).split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            for a in node.names:
                sub = f"{name}.{a.name}"
                if sub in MODULES:  # `from pkg import module`
                    out.append((sub, None, node.lineno, id(node) in nested, lines[node.lineno - 1]))
                else:
                    out.append((name, a.name, node.lineno, id(node) in nested, lines[node.lineno - 1]))
    return out


ALL_IMPORTS = {m: imports_of(m) for m in MODULES}


def layer(package: str) -> int:
    if package.startswith("dit_jax.utils"):
        return 0
    if package.startswith("dit_jax.data"):
        return 1
    if package.startswith("dit_jax.cli"):
        return 4
    if package.startswith("convert"):
        return 3
    return 2  # dit_jax core (and any future core sub-package)


def test_no_cycles_between_packages():
    graph = defaultdict(set)
    for m, imps in ALL_IMPORTS.items():
        for name, _, _, _, _ in imps:
            if is_project(name) and name in MODULES or is_project(name):
                target = name if name in MODULES else name.rsplit(".", 1)[0]
                a, b = package_of(m), package_of(target) if target in MODULES else target
                if a != b:
                    graph[a].add(b)
    seen, stack, cycles = set(), [], []

    def visit(p):
        if p in stack:
            cycles.append(stack[stack.index(p):] + [p])
            return
        if p in seen:
            return
        seen.add(p)
        stack.append(p)
        for q in sorted(graph[p]):
            visit(q)
        stack.pop()

    for p in sorted(graph):
        visit(p)
    assert not cycles, f"cycles between packages: {cycles}"


def test_layers_point_down():
    bad = []
    for m, imps in ALL_IMPORTS.items():
        for name, _, line, _, text in imps:
            if not is_project(name):
                continue
            target = name if name in MODULES else name.rsplit(".", 1)[0]
            src, dst = package_of(m), package_of(target) if target in MODULES else target
            if layer(dst) > layer(src):
                bad.append(f"{MODULES[m]}:{line}: {src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})")
    assert not bad, "\n".join(bad)


def test_core_imports_neither_torch_nor_convert():
    bad = []
    for m, imps in ALL_IMPORTS.items():
        if not m.startswith("dit_jax") or m.startswith("dit_jax.cli"):
            continue
        for name, _, line, _, text in imps:
            if name.split(".")[0] in CORE_FORBIDDEN:
                bad.append(f"{MODULES[m]}:{line}: {text.strip()}")
    assert not bad, "the core imports torch/convert:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for m, imps in ALL_IMPORTS.items():
        aliases = {}
        for name, what, line, _, text in imps:
            if is_project(name) and what and what.startswith("_") and not what.startswith("__") and name != m:
                bad.append(f"{MODULES[m]}:{line}: {text.strip()}")
        tree = ast.parse(open(MODULES[m]).read())
        for node in ast.walk(tree):  # `import a.b as c` / `from a import b` (a module) -> alias c/b
            if isinstance(node, ast.Import):
                for a in node.names:
                    if is_project(a.name):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and is_project(node.module):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{MODULES[m]}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_imports_at_module_top_except_heavy_optional_stacks():
    bad = []
    for m, imps in ALL_IMPORTS.items():
        for name, _, line, nested, text in imps:
            if not nested:
                continue
            allowed = any(name == a or name.startswith(a + ".") for a in LAZY_ALLOWED)
            if not allowed or "#" not in text:
                bad.append(f"{MODULES[m]}:{line}: {text.strip()}"
                           + ("" if allowed else "  (not an optional heavy stack)")
                           + ("" if "#" in text else "  (no one-line reason)"))
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


@pytest.mark.parametrize("rule", ["cycle", "core", "private"])
def test_the_checks_can_fail(rule, tmp_path, monkeypatch):
    """Each rule fails on a planted violation (a module added to the scan)."""
    planted = {"cycle": "from dit_jax.cli import common\n", "core": "import torch\n",
               "private": "from dit_jax.model import _swap_last\n"}[rule]
    path = tmp_path / "planted.py"
    path.write_text(planted)
    name = "dit_jax.utils.planted" if rule == "cycle" else "dit_jax.planted"
    monkeypatch.setitem(MODULES, name, str(path))
    monkeypatch.setitem(ALL_IMPORTS, name, imports_of(name))
    check = {"cycle": test_layers_point_down, "core": test_core_imports_neither_torch_nor_convert,
             "private": test_no_private_names_across_modules}[rule]
    with pytest.raises(AssertionError):
        check()
