"""The package's layers (docs/architecture.md, "Layers"), checked by reading every module's
imports with ``ast``.

Rules, for every import statement anywhere in a module (at module level or inside a
function, ``import x`` or ``from x import y``):

* a module imports only from its own package or from a lower layer (``LAYERS``, bottom
  first); packages in the same layer are independent of each other;
* ``blockexport`` (the version) and ``blockexport.errors`` are below everything and import
  nothing of the project;
* every package belongs to a layer: a new one must be placed in ``LAYERS`` (and the docs);
* imports are absolute (``from blockexport.x import y``): one style, greppable;
* a few rules inside a layer (``SEPARATE``): the NBD client never imports the server machine;
* no module imports itself through a circle of imports.

The checker runs on the real package and on small fixture trees that break each rule, so the
test shows it can fail.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: Bottom first; packages in one tuple share a layer.
LAYERS = (
    ("util",),
    ("qapi",),
    ("nbd", "vhost_user", "virtio", "fuse"),
    ("crypto", "authz"),
    ("block",),
    ("objects",),
    ("exports",),
    ("qmp",),
    ("daemon",),
    ("cli",),
)
#: Modules every layer may import; they import nothing of the project.
BASE = ("", "errors")
#: (importer, imported) pairs of modules forbidden although the layers allow them.
SEPARATE = (
    ("nbd.client", "nbd.handshake"),
)


def _rank(part: str, layers) -> int | None:
    for i, names in enumerate(layers):
        if part in names:
            return i
    return None


def _modules(root: Path, pkg: str) -> dict[str, Path]:
    """Dotted module name (without the ``pkg.`` prefix; ``""`` for the package) -> file."""
    out = {}
    for path in sorted((root / pkg).rglob("*.py")):
        rel = path.relative_to(root / pkg).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, pkg: str):
    """``(lineno, target or None, text)`` for each import of ``pkg``; target is a dotted
    name relative to ``pkg`` (``None`` for a relative import)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == pkg or alias.name.startswith(pkg + "."):
                    yield node.lineno, alias.name[len(pkg) + 1:], [], ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, None, [], ast.unparse(node)
            elif node.module == pkg or node.module.startswith(pkg + "."):
                yield (node.lineno, node.module[len(pkg) + 1:],
                       [a.name for a in node.names], ast.unparse(node))


def _target_module(target: str, names, modules) -> list[str]:
    """The modules an import loads: ``from a import b`` loads ``a.b`` when that is a
    module, else ``a``."""
    out = []
    for name in names:
        sub = f"{target}.{name}" if target else name
        if sub in modules:
            out.append(sub)
    return out or [target]


def check_tree(root: Path, pkg: str = "blockexport", layers=LAYERS, base=BASE,
               separate=SEPARATE) -> list[str]:
    """Every violation of the rules in ``root/pkg``, one line each."""
    modules = _modules(root, pkg)
    problems = []
    unplaced = set()
    graph: dict[str, set] = {m: set() for m in modules}
    for mod, path in modules.items():
        where = f"{pkg}.{mod}" if mod else pkg
        top = mod.split(".")[0]
        if mod in base:
            my_rank = -1
        else:
            my_rank = _rank(top, layers)
            if my_rank is None:
                if top not in unplaced:
                    unplaced.add(top)
                    problems.append(f"{where}: package '{top}' is in no layer")
                continue
        for lineno, target, names, text in _imports(path, pkg):
            loc = f"{path.relative_to(root)}:{lineno}"
            if target is None:
                problems.append(f"{loc}: relative import ({text}); write it absolute")
                continue
            deps = _target_module(target, names, modules)
            graph[mod].update(deps)
            if my_rank == -1:
                problems.append(f"{loc}: {where} is below every layer but imports {text}")
                continue
            dep_top = target.split(".")[0]
            if target in base or dep_top == top:
                pass
            else:
                rank = _rank(dep_top, layers)
                if rank is None:
                    problems.append(f"{loc}: imports package '{dep_top}', which is in no layer")
                elif rank >= my_rank:
                    what = "a higher" if rank > my_rank else "another package of its"
                    problems.append(f"{loc}: {where} ({top}) imports '{dep_top}' of {what} "
                                    f"layer: {text}")
            for importer, imported in separate:
                if mod == importer and (target == imported or imported in deps):
                    problems.append(f"{loc}: {where} must not import {pkg}.{imported}")
    problems += [f"import circle: {' -> '.join(pkg + '.' + m for m in c)}"
                 for c in _circles(graph)]
    return problems


def _circles(graph: dict[str, set]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each listed as
    a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set = set()
    out = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                comp.sort()
                out.append(comp + [comp[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ---- the package ---------------------------------------------------------------------------

def test_the_package_follows_its_layers():
    assert check_tree(SRC) == []


def test_every_package_is_in_a_layer():
    tops = {p.name for p in (SRC / "blockexport").iterdir()
            if p.is_dir() and (p / "__init__.py").exists()}
    tops |= {p.stem for p in (SRC / "blockexport").glob("*.py")} - {"__init__", "errors"}
    placed = {name for layer in LAYERS for name in layer}
    assert tops <= placed


# ---- the checker on fixture trees ----------------------------------------------------------

def _tree(tmp_path: Path, files: dict) -> Path:
    for name, text in files.items():
        path = tmp_path / "blockexport" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for d in [p for p in (tmp_path / "blockexport").rglob("*") if p.is_dir()] + \
            [tmp_path / "blockexport"]:
        (d / "__init__.py").touch()
    return tmp_path


GOOD = {
    "errors.py": "class Error(Exception): pass\n",
    "util/cutils.py": "from blockexport.errors import Error\n",
    "util/ids.py": "",
    "block/node.py": "from blockexport.util.cutils import x\nimport blockexport.errors\n",
    "block/graph.py": "from blockexport.block import node\n",
    "cli/main.py": "def main():\n    from blockexport.block.graph import BlockGraph\n",
}


def test_checker_accepts_a_good_tree(tmp_path):
    assert check_tree(_tree(tmp_path, GOOD)) == []


@pytest.mark.parametrize("name,text,expect", [
    # a lower layer importing a higher one, at module level
    ("util/sockets.py", "from blockexport.cli.main import main\n",
     "blockexport.util.sockets (util) imports 'cli' of a higher layer"),
    # ... or hidden inside a function
    ("block/probe.py", "def f():\n    import blockexport.qmp.schema\n",
     "blockexport.block.probe (block) imports 'qmp' of a higher layer"),
    # two packages of one layer
    ("nbd/x.py", "from blockexport.virtio import ring\n",
     "imports 'virtio' of another package of its layer"),
    # a relative import
    ("block/drivers.py", "from .node import BlockNode\n", "relative import"),
    # a package nobody placed
    ("gui/window.py", "", "package 'gui' is in no layer"),
    # errors must stay at the bottom
    ("errors.py", "from blockexport.util.ids import id_wellformed\n",
     "blockexport.errors is below every layer"),
    # the client machine must not import the server machine
    ("nbd/client.py", "from blockexport.nbd.handshake import NEED_DATA\n",
     "blockexport.nbd.client must not import blockexport.nbd.handshake"),
    ("nbd/client.py", "from blockexport.nbd import handshake\n",
     "blockexport.nbd.client must not import blockexport.nbd.handshake"),
])
def test_checker_reports_a_broken_rule(tmp_path, name, text, expect):
    files = dict(GOOD, **{"nbd/handshake.py": "", name: text})
    problems = check_tree(_tree(tmp_path, files))
    assert len(problems) == 1 and expect in problems[0], problems


def test_checker_reports_an_import_circle(tmp_path):
    files = dict(GOOD)
    files["util/a.py"] = "from blockexport.util import b\n"
    files["util/b.py"] = "def f():\n    from blockexport.util.a import g\n"
    problems = check_tree(_tree(tmp_path, files))
    assert problems == ["import circle: blockexport.util.a -> blockexport.util.b -> "
                        "blockexport.util.a"]
