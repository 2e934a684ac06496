"""
The layering of rrlb's modules, as C{docs/architecture.md} writes it, holds
in the code: every import (type-only ones in C{TYPE_CHECKING} blocks and
imports inside functions included) points down the layer list, and no
imports form a cycle. The tests themselves keep one support module: no
test module imports another, and none waits for a fixed time.

Everything is read with C{ast}; nothing is imported.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Iterable, Iterator, Mapping, Optional

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "rrlb"

# Imports that break the layering, each with why and who removes it (none
# today). An entry that is no longer needed fails the test: take it out then.
ALLOWED: dict[tuple[str, str], str] = {}

# Test functions that still wait a fixed time, each with why (test module,
# function): to be turned into waits for the event.
ALLOWED_WAITS: dict[tuple[str, str], str] = {}

# Issue 18: no module over this many lines; a new capability gets its own.
MAX_LINES = 600

Layers = dict[str, int]
# importer -> imported -> the line numbers of the imports
Graph = dict[str, dict[str, list[int]]]


# -- the layer list -------------------------------------------------------------


def layer_list(text: str) -> list[list[str]]:
    """
    The layers of the first code block under the C{## Layers} heading of
    C{text}, the top one first; a C{#} starts a comment.
    """
    section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        raise AssertionError("docs/architecture.md has no '## Layers' section")
    block = re.search(r"^```[^\n]*\n(.*?)^```", section.group(1), re.M | re.S)
    if block is None:
        raise AssertionError("the '## Layers' section has no code block")
    layers = []
    for line in block.group(1).splitlines():
        names = line.split("#", 1)[0].split()
        if names:
            layers.append(names)
    return layers


def layer_index(layers: list[list[str]]) -> Layers:
    """
    Module name -> its layer's position (0 at the top).
    """
    index: Layers = {}
    for position, names in enumerate(layers):
        for name in names:
            if name in index:
                raise AssertionError(f"{name} is listed twice in the layer list")
            index[name] = position
    return index


def layer_of(module: str, index: Layers) -> Optional[int]:
    """
    The layer of C{module} (C{workers.child} is where C{workers} is, unless
    it is listed itself).
    """
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        position = index.get(".".join(parts[:end]))
        if position is not None:
            return position
    return None


# -- the imports ---------------------------------------------------------------------


def module_files(root: str, package: str = PACKAGE) -> dict[str, str]:
    """
    Every module of C{package} under C{root}: dotted name inside the
    package (C{proxy}, C{workers.child}; the package itself is C{package})
    -> file path.
    """
    found = {}
    top = os.path.join(root, package)
    for directory, _, files in os.walk(top):
        for filename in files:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(directory, filename)
            relative = os.path.relpath(path, top)[: -len(".py")].split(os.sep)
            if relative[-1] == "__init__":
                relative = relative[:-1]
            found[".".join(relative) or package] = path
    return found


def imported_modules(
    tree: ast.AST, module: str, modules: Iterable[str], package: str = PACKAGE
) -> Iterator[tuple[str, int]]:
    """
    The modules of C{package} that C{module}'s code imports, with the line
    of each import: every import statement wherever it is (at the top, in a
    C{TYPE_CHECKING} block, in a function).
    """
    known = set(modules)
    is_package = any(m.startswith(module + ".") for m in known) or module == package

    def resolve(dotted: str, names: list[str]) -> Iterator[str]:
        # "from rrlb.x import y": rrlb.x.y if that is a module, else rrlb.x.
        inside = dotted[len(package) + 1 :] if dotted != package else ""
        for name in names:
            candidate = f"{inside}.{name}" if inside else name
            if candidate in known:
                yield candidate
            else:
                yield inside or package

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    yield alias.name[len(package) + 1 :] or package, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [package] + ([] if module == package else module.split("."))
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                dotted = ".".join(base + ([node.module] if node.module else []))
            else:
                dotted = node.module or ""
            if dotted == package or dotted.startswith(package + "."):
                for target in resolve(dotted, [a.name for a in node.names]):
                    yield target, node.lineno


def import_graph(root: str = ROOT) -> tuple[Graph, dict[str, str]]:
    """
    The imports between C{rrlb}'s modules (a module importing itself left
    out), and the file of each module.
    """
    files = module_files(root)
    graph: Graph = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges: dict[str, list[int]] = {}
        for target, line in imported_modules(tree, module, files):
            if target != module:
                edges.setdefault(target, []).append(line)
        graph[module] = edges
    return graph, files


# -- the checks ------------------------------------------------------------------------


def same_package(a: str, b: str) -> bool:
    return a.split(".")[0] == b.split(".")[0] and ("." in a or "." in b)


def layering_errors(graph: Graph, index: Layers) -> dict[tuple[str, str], str]:
    """
    Each import that does not point down the layers: (importer, imported)
    -> what is wrong with it.
    """
    errors = {}
    for module, edges in graph.items():
        mine = layer_of(module, index)
        for target in edges:
            theirs = layer_of(target, index)
            if mine is None or theirs is None or same_package(module, target):
                continue
            if theirs < mine:
                errors[(module, target)] = "imports a module of a higher layer"
            elif theirs == mine:
                errors[(module, target)] = "imports a module of its own layer"
    return errors


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """
    The import cycles of C{graph}: each strongly connected set of two or
    more modules, sorted (Tarjan's algorithm).
    """
    counter = [0]
    number: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        number[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in number:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], number[target])
        if low[node] == number[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in number:
            visit(node)
    return sorted(found)


def without(graph: Graph, edges: Iterable[tuple[str, str]]) -> Graph:
    dropped = set(edges)
    return {
        module: {t: lines for t, lines in targets.items() if (module, t) not in dropped}
        for module, targets in graph.items()
    }


def long_modules(files: Mapping[str, str], limit: int = MAX_LINES) -> list[str]:
    """
    C{"path: N lines"} for each of C{files} (module -> path) over C{limit}
    lines.
    """
    found = []
    for path in sorted(files.values()):
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > limit:
            found.append(f"{os.path.relpath(path, ROOT)}: {count} lines")
    return found


def where(files: Mapping[str, str], module: str, lines: list[int]) -> str:
    path = os.path.relpath(files.get(module, module), ROOT)
    return ", ".join(f"{path}:{line}" for line in sorted(set(lines)))


class LayerListTests(unittest.TestCase):
    """
    The pieces of the check, on small made-up inputs.
    """

    def test_parse(self) -> None:
        """
        The list is the code block of the C{## Layers} section, one layer
        per line, the top one first; comments and blank lines are skipped.
        """
        text = (
            "# Title\n\n## Layers\n\nSome words.\n\n```\ntap  # the top\n\n"
            "service traffic\nconfig\n```\n\n## Next\n```\nnot this\n```\n"
        )
        layers = layer_list(text)
        self.assertEqual(layers, [["tap"], ["service", "traffic"], ["config"]])
        index = layer_index(layers)
        self.assertEqual(layer_of("traffic", index), 1)
        self.assertEqual(layer_of("service.part", index), 1)
        self.assertIsNone(layer_of("other", index))
        self.assertRaises(AssertionError, layer_list, "## Other\n```\ntap\n```\n")
        self.assertRaises(AssertionError, layer_index, [["a"], ["b", "a"]])

    def test_imports_found(self) -> None:
        """
        Every form of import is found: absolute and relative, of a module or
        of a name in one, at the top, under C{TYPE_CHECKING} and inside a
        function; other packages' imports are not.
        """
        source = (
            "from typing import TYPE_CHECKING\n"
            "import rrlb.config\n"
            "from rrlb import pool, __version__\n"
            "from rrlb.parser import parse\n"
            "from . import body\n"
            "from .workers import wire\n"
            "if TYPE_CHECKING:\n"
            "    from rrlb.tap import Options\n"
            "def f():\n"
            "    from rrlb.health import describe_failure\n"
            "import twisted.web\n"
        )
        modules = ["config", "pool", "parser", "body", "workers", "workers.wire", "tap", "health"]
        found = list(imported_modules(ast.parse(source), "proxy", modules))
        self.assertEqual(
            found,
            [
                ("config", 2),
                ("pool", 3),
                ("rrlb", 3),
                ("parser", 4),
                ("body", 5),
                ("workers.wire", 6),
                ("tap", 8),
                ("health", 10),
            ],
        )
        inside = list(
            imported_modules(
                ast.parse("from . import wire\nfrom .. import pool\n"), "workers.child", modules
            )
        )
        self.assertEqual(inside, [("workers.wire", 1), ("pool", 2)])

    def test_errors(self) -> None:
        """
        An import up the list, or across one layer, is an error; one down
        the list, or between the modules of one package, is not.
        """
        index = layer_index([["tap"], ["service", "workers"], ["proxy", "health"], ["config"]])
        graph: Graph = {
            "tap": {"service": [1]},
            "service": {"tap": [2], "config": [3]},
            "proxy": {"health": [4], "config": [5]},
            "workers.child": {"workers.wire": [6], "service": [7]},
            "workers.wire": {},
        }
        self.assertEqual(
            layering_errors(graph, index),
            {
                ("service", "tap"): "imports a module of a higher layer",
                ("proxy", "health"): "imports a module of its own layer",
                ("workers.child", "service"): "imports a module of its own layer",
            },
        )

    def test_long_modules(self) -> None:
        """
        L{long_modules} names the files over the limit, with their lengths,
        and only those.
        """
        root = self.mktemp()
        os.makedirs(os.path.join(root, "pkg"))
        for name, count in (("short", 3), ("exact", 4), ("long", 5)):
            with open(os.path.join(root, "pkg", f"{name}.py"), "w") as f:
                f.write("pass\n" * count)
        found = long_modules(module_files(root, "pkg"), limit=4)
        self.assertEqual([line.rsplit(": ", 1)[1] for line in found], ["5 lines"])
        self.assertTrue(found[0].split(": ")[0].endswith(os.path.join("pkg", "long.py")))

    def test_cycles(self) -> None:
        """
        Every strongly connected set of modules is a cycle, however long.
        """
        graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["e"], "e": ["d", "f"], "f": []}
        self.assertEqual(cycles(graph), [["a", "b", "c"], ["d", "e"]])
        self.assertEqual(cycles({"a": ["b"], "b": []}), [])


class LayeringTests(unittest.TestCase):
    """
    rrlb's modules against C{docs/architecture.md}.
    """

    def setUp(self) -> None:
        with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
            self.index = layer_index(layer_list(f.read()))
        self.graph, self.files = import_graph()

    def test_every_module_listed(self) -> None:
        """
        Every module of rrlb has a place in the layer list.
        """
        missing = sorted(m for m in self.graph if layer_of(m, self.index) is None)
        self.assertEqual(missing, [], "modules missing from docs/architecture.md's layer list")

    def test_imports_point_down(self) -> None:
        """
        Every import points down the layer list, but the ones in L{ALLOWED}.
        """
        errors = layering_errors(self.graph, self.index)
        wrong = [
            f"{where(self.files, a, self.graph[a][b])}: {a} -> {b}: {why}"
            for (a, b), why in sorted(errors.items())
            if (a, b) not in ALLOWED
        ]
        self.assertEqual(wrong, [], "\n".join(wrong))

    def test_no_cycles(self) -> None:
        """
        No import cycle, type-only and function-level imports included (an
        import in L{ALLOWED} is left out: it is an error already).
        """
        found = cycles(without(self.graph, ALLOWED))
        self.assertEqual(found, [], f"import cycles: {found}")

    def test_module_size(self) -> None:
        """
        No module of rrlb (its packages included) is over L{MAX_LINES}
        lines (issue 18): one that grows past it is split along a seam.
        """
        found = long_modules(self.files)
        self.assertEqual(found, [], f"over {MAX_LINES} lines, split them: {found}")

    def test_allowed_still_needed(self) -> None:
        """
        Each entry of L{ALLOWED} is an import that is still there and still
        wrong: once fixed, it goes from the list.
        """
        errors = layering_errors(self.graph, self.index)
        stale = sorted(edge for edge in ALLOWED if edge not in errors)
        self.assertEqual(stale, [], f"fixed, remove them from ALLOWED: {stale}")


class TestModulesTests(unittest.TestCase):
    """
    The tests keep one support module, and no fixed waits.
    """

    def test_only_support_imported(self) -> None:
        """
        No test module imports another: what they share is in
        L{tests.support}, which imports no test module either.
        """
        files = module_files(ROOT, "tests")
        wrong = []
        for module, path in sorted(files.items()):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for target, line in imported_modules(tree, module, files, "tests"):
                if target != "support" or module == "support":
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports tests.{target}")
        self.assertEqual(wrong, [], "\n".join(wrong))

    def test_no_fixed_waits(self) -> None:
        """
        No test module calls C{sleep} (or C{deferLater}): a test waits for
        an event, polls a condition with a bound (L{tests.support.wait_for}),
        or drives a L{twisted.internet.task.Clock}; but the functions in
        L{ALLOWED_WAITS}, and an entry there no longer needed fails too.
        """
        files = module_files(ROOT, "tests")
        wrong = []
        seen = set()
        for module, path in sorted(files.items()):
            if module == "support":
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for function, node in calls(tree, ("sleep", "deferLater")):
                if (module, function) in ALLOWED_WAITS:
                    seen.add((module, function))
                else:
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} in {function}")
        self.assertEqual(wrong, [], "fixed waits:\n" + "\n".join(wrong))
        stale = sorted(set(ALLOWED_WAITS) - seen)
        self.assertEqual(stale, [], f"no longer waiting, remove them from ALLOWED_WAITS: {stale}")


def calls(tree: ast.AST, names: tuple[str, ...]) -> Iterator[tuple[str, ast.Call]]:
    """
    The calls of a function named one of C{names} in C{tree}, each with the
    name of the function it is in (C{""} at module level).
    """

    def visit(node: ast.AST, function: str) -> Iterator[tuple[str, ast.Call]]:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in names:
                    yield function, child
            yield from visit(child, inner)

    return visit(tree, "")
