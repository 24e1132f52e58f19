"""The project's import graph, read from the code (ast): no import cycle, util/ imports nothing from the top level
(the pipeline's scripts or tools/), and the pipeline (the top-level scripts and util/) imports nothing from tools/."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules():
    """{module name: file} for the top-level scripts, util/ and tools/."""
    files = list(ROOT.glob("*.py")) + list(ROOT.glob("util/*.py")) + list(ROOT.glob("tools/*.py"))
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def imports_of(path, modules):
    """The project modules a file imports, at any depth of the file (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(edges):
    """Every module that lies on a cycle, found by depth-first search."""
    on_cycle, state = set(), {}

    def visit(node, stack):
        state[node] = "open"
        for target in edges.get(node, ()):
            if state.get(target) == "open":
                on_cycle.update(stack[stack.index(target):])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return on_cycle


def test_the_graph_has_no_cycle():
    assert cycles(graph()) == set()


def imports_of_tools(edges):
    """{module: [the tools/ modules it imports]} for the pipeline's modules (the top-level scripts and util/) that
    import any."""
    found = {name: sorted(t for t in targets if t.split(".")[0] == "tools")
             for name, targets in edges.items() if name.split(".")[0] != "tools"}
    return {name: targets for name, targets in found.items() if targets}


def test_util_imports_nothing_from_the_top_level():
    upward = {name: sorted(t for t in targets if not t.startswith("util"))
              for name, targets in graph().items() if name.startswith("util")}
    assert {name: targets for name, targets in upward.items() if targets} == {}


def test_the_pipeline_imports_nothing_from_tools():
    assert imports_of_tools(graph()) == {}


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {"a", "b", "c"}
    assert imports_of_tools({"captioner": {"tools.release", "model"}, "util.data": {"tools"},
                             "tools.release": {"tools", "model"}}) == {"captioner": ["tools.release"],
                                                                       "util.data": ["tools"]}
    edges = graph()
    assert "model" in edges["train"] and "util.checkpoints" in edges["model"]
