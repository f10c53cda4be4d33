"""The import structure, read from the source (nothing is imported): one-way layers, no private names used
across modules, imports at the top of modules except the optional heavy stacks.

Layers, lowest first: dit_jax.utils -> dit_jax.data -> dit_jax (the core) -> convert -> dit_jax.cli. A package
may import from its own layer and the ones below it; `convert.reference` (the PyTorch re-statements) sits
beside convert. A cycle between packages, torch or convert imported by the core, or `from m import _name`
/ `m._name` across modules fails the test with the file and line.

Each rule is a function of a source tree, so the checker itself is tested against an independent source:
small package trees written here by hand, a clean one (no rule may report anything) and one per planted
violation (exactly the planted rule must report it, naming the file and line or the packages of the cycle).
"""
import ast
import os
import textwrap
from collections import defaultdict
from typing import Dict, List, NamedTuple, Set

import pytest

from conftest import ROOT

PACKAGES = ("dit_jax", "convert")
# Optional heavy stacks that may be imported inside a function (with a one-line reason on that line).
LAZY_ALLOWED = ("torch", "tensorflow", "tensorflow_datasets", "sklearn", "jax_plugins", "libtpu", "dit_jax.data.tfds",
                "jax.experimental.pallas.ops.tpu")
CORE_FORBIDDEN = ("torch", "convert", "diffusers", "torchvision")


class Import(NamedTuple):
    module: str  # the imported module (`from m import name` -> m, or m.name when that is a module)
    name: object  # the name taken from it (None for a module)
    line: int
    nested: bool  # inside a function or class
    text: str  # the source line


class Tree:
    """The modules of PACKAGES below `root` and what each imports (parsed, never imported)."""

    def __init__(self, root: str):
        self.root = root
        self.files: Dict[str, str] = {}  # dotted module name -> path
        for pkg in PACKAGES:
            for dirpath, _, files in os.walk(os.path.join(root, pkg)):
                for f in sorted(files):
                    if f.endswith(".py"):
                        rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                        name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                        self.files[name] = os.path.join(dirpath, f)
        self.sources = {m: open(p).read() for m, p in self.files.items()}
        self.imports = {m: self._imports_of(m) for m in self.files}

    def where(self, module: str, line: int) -> str:
        return f"{os.path.relpath(self.files[module], self.root)}:{line}"

    def package_of(self, module: str) -> str:
        return module if self.files.get(module, "").endswith("__init__.py") else module.rsplit(".", 1)[0]

    def target_module(self, imported: str) -> str:
        """The project module an import reaches (`from pkg import name` reaches pkg.name when that is a module)."""
        return imported if imported in self.files else imported.rsplit(".", 1)[0]

    def unit_of(self, module: str) -> str:
        """What the cycle rule counts as one node: a package, except that the modules directly in dit_jax (the
        core's public face: model, diffusion, train, ...) count one by one above and below its sub-packages."""
        package = self.package_of(module)
        return module if package == "dit_jax" and module != "dit_jax" else package

    def target_package(self, imported: str) -> str:
        """The package an imported project name lives in."""
        if imported in self.files:
            return self.package_of(imported)
        return imported.rsplit(".", 1)[0] if imported.rsplit(".", 1)[0] in self.files else imported

    def _imports_of(self, module: str) -> List[Import]:
        src = self.sources[module]
        lines = src.splitlines()
        tree = ast.parse(src)
        nested = {id(sub) for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
        out = []
        for node in ast.walk(tree):
            where = (node.lineno, id(node) in nested, lines[node.lineno - 1]) if hasattr(node, "lineno") else None
            if isinstance(node, ast.Import):
                out += [Import(a.name, None, *where) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import: resolve against the package
                    base = self.package_of(module).split(".")
                    base = base[: len(base) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module
                for a in node.names:
                    sub = f"{name}.{a.name}"
                    out.append(Import(sub, None, *where) if sub in self.files else Import(name, a.name, *where))
        return sorted(out, key=lambda i: i.line)


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


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


# ---- the rules: each returns its violations as lines (empty: the tree follows the rule) ----

def package_cycles(t: Tree) -> List[str]:
    """Every set of two or more packages that import each other in a circle (a strongly connected
    component of the package graph), with the imports that close it."""
    graph: Dict[str, Set[str]] = defaultdict(set)
    witness = {}  # (package, package) -> the first import making that edge
    for m, imps in t.imports.items():
        for imp in imps:
            if is_project(imp.module):
                a, b = t.unit_of(m), t.unit_of(t.target_module(imp.module))
                if a != b:
                    graph[a].add(b)
                    witness.setdefault((a, b), t.where(m, imp.line))

    def reachable(p: str) -> Set[str]:
        seen, todo = set(), [p]
        while todo:
            for q in graph[todo.pop()]:
                if q not in seen:
                    seen.add(q)
                    todo.append(q)
        return seen

    reach = {p: reachable(p) for p in list(graph)}
    components = {frozenset(q for q in reach[p] if p in reach.get(q, ())) | {p} for p in reach if p in reach[p]}
    out = []
    for comp in sorted(components, key=sorted):
        edges = [f"{a} -> {b} ({w})" for (a, b), w in sorted(witness.items()) if a in comp and b in comp]
        out.append(f"cycle between {', '.join(sorted(comp))}: " + "; ".join(edges))
    return out


def upward_imports(t: Tree) -> List[str]:
    bad = []
    for m, imps in t.imports.items():
        for imp in imps:
            if is_project(imp.module):
                src, dst = t.package_of(m), t.target_package(imp.module)
                if layer(dst) > layer(src):
                    bad.append(f"{t.where(m, imp.line)}: {src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})")
    return bad


def core_imports_torch_or_convert(t: Tree) -> List[str]:
    return [f"{t.where(m, imp.line)}: {imp.text.strip()}" for m, imps in t.imports.items()
            if m.startswith("dit_jax") and not m.startswith("dit_jax.cli")
            for imp in imps if imp.module.split(".")[0] in CORE_FORBIDDEN]


def private_names_across_modules(t: Tree) -> List[str]:
    def private(name) -> bool:
        return bool(name) and name.startswith("_") and not name.startswith("__")

    bad = []
    for m, imps in t.imports.items():
        bad += [f"{t.where(m, imp.line)}: {imp.text.strip()}" for imp in imps
                if is_project(imp.module) and private(imp.name) and imp.module != m]
        tree = ast.parse(t.sources[m])
        aliases = {}  # local name -> project module: `import a.b as c`, `from a import b` (b a module)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name.split(".")[0]: a.name for a in node.names if is_project(a.name)})
            elif isinstance(node, ast.ImportFrom) and node.module and is_project(node.module):
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in t.files})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != m and private(node.attr)):
                bad.append(f"{t.where(m, node.lineno)}: {node.value.id}.{node.attr}")
    return bad


def imports_inside_functions(t: Tree) -> List[str]:
    bad = []
    for m, imps in t.imports.items():
        for imp in imps:
            if not imp.nested:
                continue
            allowed = any(imp.module == a or imp.module.startswith(a + ".") for a in LAZY_ALLOWED)
            if not allowed or "#" not in imp.text:
                bad.append(f"{t.where(m, imp.line)}: {imp.text.strip()}"
                           + ("" if allowed else "  (not an optional heavy stack)")
                           + ("" if "#" in imp.text else "  (no one-line reason)"))
    return bad


RULES = {"cycles": package_cycles, "layers": upward_imports, "core": core_imports_torch_or_convert,
         "private": private_names_across_modules, "nested": imports_inside_functions}


# ---- the project follows every rule ----

@pytest.fixture(scope="module")
def project():
    return Tree(ROOT)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_project_follows(project, rule):
    assert len(project.files) > 50  # the scan found the packages
    bad = RULES[rule](project)
    assert not bad, f"{rule}:\n" + "\n".join(bad)


# ---- the rules against small trees written by hand ----

CLEAN = {  # every rule holds here; each case below changes one or two files
    "dit_jax/__init__.py": "",
    "dit_jax/model.py": """
        import numpy as np
        from dit_jax.utils import io

        def _helper():
            return io.__name__  # a dunder is not private

        _helper()
        """,
    "dit_jax/utils/__init__.py": "",
    "dit_jax/utils/io.py": "import os\n",
    "dit_jax/data/__init__.py": "",
    "dit_jax/data/src.py": "from dit_jax.utils.io import read\n",
    "dit_jax/evaluation/__init__.py": "",
    "dit_jax/evaluation/fid.py": "from dit_jax.data import src\nfrom dit_jax.model import DiT\n",
    "dit_jax/cli/__init__.py": "",
    "dit_jax/cli/main.py": "import torch\nimport convert.api\nfrom dit_jax import model\n",
    "convert/__init__.py": "from dit_jax.model import DiT\n",
    "convert/api.py": """
        from . import mapping

        def load(path):
            import torch  # optional heavy stack: only .pt files need it
            return torch.load(path, weights_only=True)
        """,
    "convert/mapping.py": "from dit_jax.utils.io import read\n",
}

CASES = {  # name: (files changed, {rule: [text every reported line must hold, one per violation]})
    "two_package_cycle": (
        {"dit_jax/evaluation/fid.py": "from dit_jax.data import src\nfrom dit_jax import model\n",
         "dit_jax/model.py": "import numpy as np\nfrom dit_jax.evaluation import fid\n"},
        {"cycles": ["cycle between dit_jax.evaluation, dit_jax.model: dit_jax.evaluation -> dit_jax.model (dit_jax/evaluation/fid.py:2); dit_jax.model -> dit_jax.evaluation (dit_jax/model.py:2)"]}),
    "three_package_cycle_through_relative_imports": (
        {"dit_jax/a/__init__.py": "", "dit_jax/a/x.py": "from ..b import y\n",
         "dit_jax/b/__init__.py": "", "dit_jax/b/y.py": "# line 1\n\nfrom dit_jax.c import z\n",
         "dit_jax/c/__init__.py": "", "dit_jax/c/z.py": "import dit_jax.a.x\n"},
        {"cycles": ["cycle between dit_jax.a, dit_jax.b, dit_jax.c: dit_jax.a -> dit_jax.b (dit_jax/a/x.py:1); "
                    "dit_jax.b -> dit_jax.c (dit_jax/b/y.py:3); dit_jax.c -> dit_jax.a (dit_jax/c/z.py:1)"]}),
    "lower_layer_imports_the_command_lines": (
        {"dit_jax/data/src.py": "from dit_jax.utils.io import read\nfrom dit_jax.cli import main\n"},
        {"layers": ["dit_jax/data/src.py:2: dit_jax.data (layer 1) imports dit_jax.cli (layer 4)"]}),
    "core_imports_torch_at_the_top": (
        {"dit_jax/model.py": "from torch import nn\n"},
        {"core": ["dit_jax/model.py:1: from torch import nn"]}),
    "core_imports_torch_lazily_even_with_a_reason": (
        {"dit_jax/data/src.py": "def f():\n    import torch  # heavy\n"},
        {"core": ["dit_jax/data/src.py:2: import torch"]}),
    "core_imports_convert": (
        {"dit_jax/evaluation/fid.py": "from convert import api\n"},
        {"core": ["dit_jax/evaluation/fid.py:1: from convert import api"],
         "layers": ["dit_jax/evaluation/fid.py:1: dit_jax.evaluation (layer 2) imports convert (layer 3)"]}),
    "private_name_imported": (
        {"dit_jax/data/src.py": "from dit_jax.utils.io import _read\n"},
        {"private": ["dit_jax/data/src.py:1: from dit_jax.utils.io import _read"]}),
    "private_attribute_of_an_imported_module": (
        {"dit_jax/evaluation/fid.py": "from dit_jax.data import src\n\nx = src._cache\n",
         "convert/mapping.py": "import dit_jax.utils.io as io2\nio2._buffer()\n"},
        {"private": ["convert/mapping.py:2: io2._buffer", "dit_jax/evaluation/fid.py:3: src._cache"]}),
    "import_inside_a_function": (
        {"dit_jax/model.py": "def f():\n    import numpy as np  # why not\n",
         "convert/api.py": "def load(path):\n    import torch\n"},
        {"nested": ["convert/api.py:2: import torch  (no one-line reason)",
                    "dit_jax/model.py:2: import numpy as np  # why not  (not an optional heavy stack)"]}),
}


def write_tree(root, files: Dict[str, str]) -> Tree:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return Tree(str(root))


def test_the_clean_tree_passes_every_rule(tmp_path):
    t = write_tree(tmp_path, CLEAN)
    assert len(t.files) == len(CLEAN)
    assert {rule: check(t) for rule, check in RULES.items()} == {rule: [] for rule in RULES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_planted_violation_is_reported(tmp_path, case):
    changed, expected = CASES[case]
    t = write_tree(tmp_path, {**CLEAN, **changed})
    got = {rule: sorted(check(t)) for rule, check in RULES.items()}
    want = {rule: expected.get(rule, []) for rule in RULES}
    assert [len(v) for v in got.values()] == [len(v) for v in want.values()], got
    for rule in RULES:
        for line, needle in zip(got[rule], want[rule]):
            assert needle in line, (rule, got[rule])
