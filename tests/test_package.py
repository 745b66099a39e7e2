"""The shape of the package: an import graph without cycles whose rooms import only what
docs/architecture.md allows, a public namespace `dir(px)` shows, and the previous release's names
working with a DeprecationWarning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prisma_ext as px

PACKAGE = Path(px.__file__).resolve().parent
CORE = {"errors", "layout", "images", "_deprecated", "_state", "_files"}

# room -> the rooms it may import (docs/architecture.md draws the same table)
ALLOWED = {
    "core": set(),
    "hooked": {"core"},
    "sitemaps": {"core"},
    "adapters": {"core", "hooked", "sitemaps"},
    "traced": {"core", "hooked", "sitemaps", "adapters", "verification"},
    "data": {"core"},
    "zoo": {"core", "data"},
    "sources": {"core", "adapters", "zoo"},
    "loading": {"core", "sources", "adapters", "traced", "verification"},
    "verification": {"core", "hooked"},
    "analysis": {"core", "hooked", "viz"},
    "metrics": {"analysis"},
    "viz": {"core"},
    "report": {"core", "analysis", "viz", "loading", "data", "zoo"},
    "catalog": {"core", "sources", "zoo"},
    "cli": {"core", "report", "catalog", "loading", "data", "cli_sae"},
    "cli_sae": {"core", "sae", "report", "analysis", "data"},
    "bridge": {"core"},
    "sae": {"core", "analysis", "viz", "report", "zoo", "data", "loading", "sitemaps"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").is_file()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """Every prisma_ext module `path` imports, at module level or inside functions (imports that
    only type checkers see are left out)."""
    name = module_name(path)
    package = name if is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("prisma_ext"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("prisma_ext"):
                if node.module:  # `from . import zoo` imports the submodule, not the package's names
                    found.add(target)
                for alias in node.names:  # `from . import zoo`: a submodule
                    if is_package(target) or (PACKAGE.parent / Path(*target.split("."))).is_dir():
                        sub = f"{target}.{alias.name}"
                        if is_package(sub) or (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file():
                            found.add(sub)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def module_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return "core" if parts[1] in CORE else parts[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_module_graph_has_no_cycle():
    graph = module_graph()
    assert len(graph) > 60 and "prisma_ext.analysis.patching.runner" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_rooms_import_only_what_the_architecture_allows():
    bad = []
    rooms: dict[str, set[str]] = {}
    for module, imported in module_graph().items():
        src = room(module)
        if src == "root":
            continue  # prisma_ext/__init__ serves every name lazily
        assert src in ALLOWED, f"{module}: room {src!r} is not in the architecture table"
        for target in imported:
            dst = room(target)
            assert dst != "root", f"{module} imports the root package; import the module the name lives in"
            if dst != src:
                rooms.setdefault(src, set()).add(dst)
                if dst not in ALLOWED[src]:
                    bad.append(f"{module} -> {target}")
    assert not bad, "imports the architecture does not allow:\n" + "\n".join(bad)
    assert find_cycle(rooms) is None


def test_the_architecture_page_draws_the_same_table():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for src, allowed in ALLOWED.items():
        line = next((ln for ln in page.splitlines() if ln.startswith(f"| `{src}` ")), None)
        assert line is not None, f"docs/architecture.md has no row for {src}"
        cell = line.split("|")[3]
        named = {w.strip("` ,") for w in cell.split()} - {"", "nothing"}
        assert named == allowed, (src, named, allowed)


def test_dir_shows_the_public_surface():
    names = dir(px)
    for name in ("load", "HookedViT", "HookedCLIP", "TracedViT", "LogitDiff", "ClassProb", "ImageTextScore",
                 "activation_patching", "logit_lens", "viz", "report", "head_statistics", "register_source"):
        assert name in names
    for name in px.__all__:
        assert getattr(px, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        px.nope  # noqa: B018


def test_result_set_is_a_mapping_not_a_dict():
    import torch

    from prisma_ext.analysis.result import AnalysisResult, ResultSet
    from prisma_ext.layout import TokenLayout

    layout = TokenLayout(1, 0, 0, (2, 2), (4, 4), (8, 8))
    one = AnalysisResult("a: x", torch.zeros(1, 2, 5), ("batch", "layer", "token"), layout)
    results = ResultSet({"x": one, "y": one})
    assert not isinstance(results, dict)
    assert list(results) == ["x", "y"] and list(results.keys()) == ["x", "y"] and "x" in results
    assert results["x"] is one and results.results() == [one, one] and len(results) == 2
    with pytest.raises(AttributeError, match=r"rs\[name\].values"):
        results.values  # noqa: B018
    with pytest.raises(Exception, match="no result 'z'"):
        results["z"]
    assert results.plot(title="t", site="y").layout.title.text.startswith("t")


# ---------------------------------------------------------------- the previous release's names
def test_old_module_paths_forward_with_a_warning():
    import prisma_ext.report
    import prisma_ext.sitemaps.attention
    import prisma_ext.sitemaps.hf
    import prisma_ext.sitemaps.spec
    from prisma_ext.traced import attention, clip_sites, sites
    from prisma_ext.viz import report

    with pytest.warns(DeprecationWarning, match="prisma_ext.sitemaps.spec.Site"):
        assert sites.Site is prisma_ext.sitemaps.spec.Site
    with pytest.warns(DeprecationWarning, match="sitemaps.attention"):
        assert attention.ExplicitMHA is prisma_ext.sitemaps.attention.ExplicitMHA
    with pytest.warns(DeprecationWarning, match="hf_vit_sites"):
        assert clip_sites.hf_vit is prisma_ext.sitemaps.hf.hf_vit_sites
    with pytest.warns(DeprecationWarning, match="prisma_ext.report.build.build_report"):
        assert report.build_report is prisma_ext.report.build_report
