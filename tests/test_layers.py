"""The import rule, kept by a test: every part of the farm imports downward only.

    layer 0  imgfarm (the package itself), errors, units, protocol, config
    layer 1  models, drivers, imageformats, bootimage
    layer 2  tasks: the orchestration (submit, take node, boot, wait, finalize), the Celery
             tasks (declared with `shared_task`, bound to no app), the app senders use
             (tasks/broker.py) and job wake-ups
    layer 3  worker, api, cli, demo: the faces. worker is the Celery app the workers run
             (it includes the task modules, and starts heartbeats on worker signals);
             the faces never import each other (the CLI starts the worker and the API
             as processes, by module name)
    agent    the program on the node: the stdlib, itself and imgfarm.protocol, nothing else

A module may import the rest of its own part (models.jobs -> models.nodes)
and any part of a lower layer; never a part of its own layer (models may not
import drivers, api may not import cli) nor one above it. Layer 0 therefore
imports nothing of the farm. The protocol module is the contract the agent
shares with the farm, so it is stdlib-only like the agent.

Every module of the package is read as source (AST), so imports inside
functions and classes count as much as those at the top. An import of a farm
module inside a function is allowed only where it loads something heavy on
purpose, only for the code path that needs it (the CLI loading Celery just
for the commands that send jobs); it then carries a comment that starts with
`lazy:` and says what it keeps out, on its own line or the line above it (or
above the group of imports it belongs to):

    # lazy: Celery loads only for the commands that send jobs
    from imgfarm.tasks.submit import submit_restore

Any other import inside a function hides a cycle: move the shared code down
a layer instead (as tasks/nodes.py holds what lifecycle and finalize share).
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "imgfarm"

AGENT = "imgfarm.agent"  # a program of its own, outside the layers
LAYERS: dict[str, int] = {
    "imgfarm": 0,  # the package's __init__: its version, nothing else
    "imgfarm.errors": 0,
    "imgfarm.units": 0,
    "imgfarm.protocol": 0,
    "imgfarm.config": 0,
    "imgfarm.models": 1,
    "imgfarm.drivers": 1,
    "imgfarm.imageformats": 1,
    "imgfarm.bootimage": 1,  # builds the agent's boot image from the host's packages
    "imgfarm.tasks": 2,
    "imgfarm.worker": 3,
    "imgfarm.api": 3,
    "imgfarm.cli": 3,
    "imgfarm.demo": 3,  # `make demo`: drives the farm from outside, as processes
}
STDLIB_ONLY = (AGENT, "imgfarm.protocol")
AGENT_MAY_IMPORT = (AGENT, "imgfarm.protocol")
LAZY_MARK = "# lazy:"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: str  # its file, as the reader edits it (tasks/submit.py)
    line: int
    target: str  # the module imported
    in_function: bool
    lazy_reason: str  # the text after "# lazy:", or ""

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}"


def part_of(module: str) -> str:
    """`imgfarm.models.jobs` -> `imgfarm.models`; `imgfarm` -> `imgfarm`."""
    return ".".join(module.split(".")[:2])


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (following the part symlinks)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(PACKAGE, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = Path(dirpath).relative_to(PACKAGE)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            parts = ["imgfarm", *rel.parts]
            if name != "__init__.py":
                parts.append(name[:-3])
            found[".".join(parts)] = Path(dirpath) / name
    return found


def _lazy_reason(lines: list[str], node: ast.stmt, import_lines: set[int]) -> str:
    """The `# lazy:` reason on the import's own lines, or on the comment line above it
    (or above the group of imports it starts or belongs to)."""
    end = node.end_lineno or node.lineno
    above = node.lineno - 1
    while above in import_lines:
        above -= 1
    for number in [*range(node.lineno, end + 1), above]:
        text = lines[number - 1] if 1 <= number <= len(lines) else ""
        at = text.find(LAZY_MARK)
        if at >= 0:
            return text[at + len(LAZY_MARK):].strip()
    return ""


def imports_of(module: str, source: str, path: str, known: set[str]) -> list[Import]:
    """The farm and non-farm imports a module's source makes, wherever they are."""
    tree = ast.parse(source)
    lines = source.splitlines()
    import_lines = {n for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                    for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, path, child.lineno, alias.name, in_function,
                                        _lazy_reason(lines, child, import_lines)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names}
                for target in sorted(targets):
                    found.append(Import(module, path, child.lineno, target, in_function,
                                        _lazy_reason(lines, child, import_lines)))
            visit(child, inside)

    visit(tree, False)
    return found


def check(imports: list[Import]) -> list[str]:
    """Every way `imports` break the rule, one message each (empty: all good)."""
    problems: list[str] = []
    for imp in imports:
        own = part_of(imp.module)
        if own not in LAYERS and own != AGENT:
            problems.append(f"{imp.path}: module {imp.module} has no layer: add {own!r} to LAYERS "
                            "in tests/test_layers.py (and to the layer table in the README)")
            continue
        top = imp.target.split(".")[0]
        farm = top == "imgfarm"
        if own in STDLIB_ONLY and not farm and top not in sys.stdlib_module_names:
            problems.append(f"{imp.where()}: {own} may import only the standard library "
                            "(it runs on the node)")
            continue
        if not farm:
            continue
        target = part_of(imp.target)
        if own == AGENT or target == AGENT:
            if own == AGENT and target not in AGENT_MAY_IMPORT:
                problems.append(f"{imp.where()}: the agent may import only itself and "
                                "imgfarm.protocol (the farm and the agent are two programs)")
            elif own != AGENT:
                problems.append(f"{imp.where()}: the agent is a separate program; share code with "
                                "it through imgfarm.protocol")
        elif target not in LAYERS:
            problems.append(f"{imp.where()}: {target} has no layer in tests/test_layers.py")
        elif target != own and LAYERS[target] >= LAYERS[own]:
            mine, theirs = LAYERS[own], LAYERS[target]
            how = "sideways, within one layer" if theirs == mine else "upward"
            problems.append(f"{imp.where()}: {how} ({own} is layer {mine}, {target} is layer "
                            f"{theirs}); move the shared code down a layer")
        if imp.in_function and not imp.lazy_reason:
            problems.append(f"{imp.where()} inside a function: move it to the top of the module, "
                            "or, if it loads something heavy on purpose, say what on that line "
                            f"or the line above ({LAZY_MARK} ...)")
    return problems


def scan() -> list[Import]:
    modules = package_modules()
    known = set(modules)
    out: list[Import] = []
    for name, path in modules.items():
        shown = str(Path(os.path.realpath(path)).relative_to(ROOT))
        out.extend(imports_of(name, path.read_text(), shown, known))
    return out


def test_every_module_has_a_layer() -> None:
    modules = package_modules()
    assert "imgfarm.tasks.lifecycle" in modules and "imgfarm.agent.main" in modules  # the walk works
    unplaced = sorted({part_of(m) for m in modules} - set(LAYERS) - {AGENT})
    assert not unplaced, f"parts without a layer in tests/test_layers.py: {unplaced}"


def test_readme_table_gives_the_same_layers() -> None:
    rows = re.findall(r"^\| `([a-z]+)/` \| (\d) \|", (ROOT / "README.md").read_text(), re.M)
    in_readme = {f"imgfarm.{folder}": int(layer) for folder, layer in rows}
    folders = {part: layer for part, layer in LAYERS.items()
               if part != "imgfarm" and (ROOT / part.removeprefix("imgfarm.")).is_dir()}
    assert in_readme == folders


def test_imports_go_downward_only() -> None:
    problems = check(scan())
    assert not problems, "the import rule is broken:\n" + "\n".join(problems)


# The checker itself, on small made-up modules: each rule can fail.

KNOWN = {"imgfarm.models.nodes", "imgfarm.drivers.base", "imgfarm.tasks.finalize", "imgfarm.errors",
         "imgfarm.worker.app", "imgfarm.tasks.lifecycle", "imgfarm.agent.main", "imgfarm.cli.main"}


def _problems(module: str, source: str) -> list[str]:
    path = module.replace("imgfarm.", "").replace(".", "/") + ".py"
    return check(imports_of(module, source, path, KNOWN | {module}))


@pytest.mark.parametrize(("module", "source", "expect"), [
    ("imgfarm.models.nodes", "from imgfarm.drivers.base import NodeInfo\n", "sideways"),
    ("imgfarm.models.nodes", "import imgfarm.tasks.finalize\n", "upward"),
    ("imgfarm.tasks.lifecycle", "from imgfarm.worker.app import app\n", "upward"),
    ("imgfarm.models.nodes", "from imgfarm.tasks.lifecycle import run_job\n", "upward"),
    ("imgfarm.cli.main", "from imgfarm.worker.app import app\n", "sideways"),
    ("imgfarm.worker.app", "from imgfarm.cli.main import app\n", "sideways"),
    ("imgfarm.errors", "from imgfarm.config import settings\n", "sideways"),
    ("imgfarm.tasks.lifecycle", "def f():\n    from imgfarm.tasks.finalize import finalize_job\n",
     "inside a function"),
    ("imgfarm.cli.main", "def f():\n    # lazy: Celery loads only for this command\n    x = 1\n"
                         "    from imgfarm.tasks import finalize\n", "inside a function"),
    ("imgfarm.agent.main", "from imgfarm.errors import ImgfarmError\n", "the agent may import only"),
    ("imgfarm.agent.main", "import httpx\n", "only the standard library"),
    ("imgfarm.tasks.lifecycle", "from imgfarm.agent import main\n", "separate program"),
    ("imgfarm.frobnicate", "import os\n", "has no layer"),
])
def test_the_checker_catches(module: str, source: str, expect: str) -> None:
    problems = _problems(module, source)
    assert len(problems) == 1 and expect in problems[0], problems
    path = module.replace("imgfarm.", "").replace(".", "/") + ".py"
    assert problems[0].startswith(path), problems  # names the file (and line) to fix


@pytest.mark.parametrize(("module", "source"), [
    ("imgfarm.tasks.lifecycle", "from imgfarm.tasks.finalize import finalize_job\n"),  # own part
    ("imgfarm.worker.app", "from imgfarm.models import nodes\nfrom imgfarm.tasks import lifecycle\n"),
    ("imgfarm.cli.main", "from imgfarm.tasks.finalize import finalize_job\n"),
    ("imgfarm.cli.main", "def f():\n    # lazy: Celery loads only for this command\n"
                         "    from imgfarm.tasks.finalize import finalize_job\n"),
    ("imgfarm.cli.main", "def f():\n    from imgfarm.tasks import finalize  # lazy: Celery only here\n"),
    ("imgfarm.cli.main", "def f():\n    # lazy: Celery loads only for this command\n"
                         "    from imgfarm.tasks import finalize\n    from imgfarm.tasks import (\n"
                         "        lifecycle,\n    )\n"),
    ("imgfarm.agent.main", "import json\nfrom imgfarm.agent import main\n"),
])
def test_the_checker_accepts(module: str, source: str) -> None:
    assert _problems(module, source) == []


def test_relative_imports_resolve() -> None:
    found = imports_of("imgfarm.models.nodes", "from . import tables\nfrom ..tasks import finalize\n",
                       "models/nodes.py", KNOWN | {"imgfarm.models.tables"})
    assert [i.target for i in found] == ["imgfarm.models.tables", "imgfarm.tasks.finalize"]
