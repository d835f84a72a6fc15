"""The source tree has the shape `docs/DESIGN.md` ("Source tree and ownership") gives it: every
package is a row of its table and every row a path of the tree, the files a row names exist,
imports run only the way its "imports" column allows (the front end tier never reaches the
engine, nothing imports the front end but its entry point, `lightllm_patches` ->
`caraserve_router` -> `kernels` and never back), no Python file passes 600 lines, and every
`scripts/...` path the docs and the code name exists."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "DESIGN.md"
PACKAGES = ("caraserve_router", "lightllm_patches", "kernels")
FIRST_PARTY = set(PACKAGES)
MAX_LINES = 600
# the words of the table's "imports" column that name first-party units
UNIT_WORDS = {"contracts": "caraserve_router.contracts", "scheduling": "caraserve_router.scheduling",
              "frontend": "caraserve_router.frontend", "lora": "caraserve_router.lora",
              "evaluation": "caraserve_router.evaluation", "assets": "caraserve_router.assets",
              "kernels": "kernels", "lightllm_patches": "lightllm_patches"}


def unit_of(module: str) -> str:
    """The unit a module belongs to: `caraserve_router.<package or module>`, or its top package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "caraserve_router" and len(parts) > 1 else parts[0]


def unit_of_row(path: str) -> str:
    return unit_of(path.strip("/").removesuffix(".py").replace("/", "."))


def first_party_imports(source: str, filename: str) -> list[tuple[str, int]]:
    """(module, line) of every first-party import in `source`, those inside functions too."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name, node.lineno) for name in names if name.split(".")[0] in FIRST_PARTY]
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit (another one) -> the `file:line`s that import it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            unit = unit_of(".".join(rel.with_suffix("").parts))
            for module, line in first_party_imports(path.read_text(encoding="utf-8"), str(rel)):
                if unit_of(module) != unit:
                    graph[unit][unit_of(module)].append(f"{rel}:{line}")
    return graph


def design_rows() -> dict[str, tuple[str, str]]:
    """path -> (owns, imports) of the layout table."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Source tree and ownership", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \|\s*(.*?)\s*\|\s*(.*?)\s*\|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def allowed_imports(rows) -> dict[str, set[str]]:
    allowed = {}
    for path, (_, imports) in rows.items():
        words = {w.strip().split(" ")[0] for w in imports.split(",")}
        allowed[unit_of_row(path)] = {UNIT_WORDS[w] for w in words if w in UNIT_WORDS}
    return allowed


def violations(graph, allowed) -> list[str]:
    found = []
    for unit, targets in sorted(graph.items()):
        for target, sites in sorted(targets.items()):
            if target not in allowed.get(unit, set()):
                found.append(f"{unit} imports {target} ({', '.join(sites[:3])})")
    return found


def test_the_checks_find_an_upward_import():
    source = "import os\nfrom caraserve_router.frontend.instance_client import X\n" \
             "def f():\n    import kernels.launch\n"
    assert first_party_imports(source, "m.py") == [("caraserve_router.frontend.instance_client", 2),
                                                   ("kernels.launch", 4)]
    graph = {"caraserve_router.scheduling": {"caraserve_router.frontend": ["scheduling/profiler.py:24"]}}
    assert violations(graph, {"caraserve_router.scheduling": {"caraserve_router.contracts"}}) == [
        "caraserve_router.scheduling imports caraserve_router.frontend (scheduling/profiler.py:24)"]


def test_the_table_and_the_tree_agree():
    rows = design_rows()
    assert rows, "the layout table of docs/DESIGN.md was not found"
    missing = [path for path in rows if not (REPO / path).exists()]
    assert missing == [], f"rows naming no path of the tree: {missing}"
    units = {f"caraserve_router/{p.name}/" for p in (REPO / "caraserve_router").iterdir() if (p / "__init__.py").is_file()}
    units |= {f"{p}/" for p in ("kernels", "lightllm_patches", "scripts", "tests")}
    units |= {f"caraserve_router/{p.name}" for p in (REPO / "caraserve_router").glob("*.py") if p.name != "__init__.py"}
    assert sorted(units - set(rows)) == [], "packages the layout table does not list"


def test_the_files_a_row_names_exist():
    missing = []
    for path, (owns, _) in design_rows().items():
        root = REPO / path
        for name in re.findall(r"`([\w/]+(?:\.py|/))`", owns):
            if "/" in name.rstrip("/"):  # a path from the repository's root
                hits = [REPO / name] if (REPO / name).exists() else []
            else:  # a file or folder somewhere under the row's path
                hits = list(root.rglob(name.rstrip("/"))) if root.is_dir() else []
            if not hits:
                missing.append(f"{path}: {name}")
    assert missing == [], missing


def test_imports_run_as_the_table_says():
    found = violations(import_graph(), allowed_imports(design_rows()))
    assert found == [], "\n".join(found)


def test_no_upward_import_whatever_the_table_says():
    graph = import_graph()
    found = [f"{u} -> {t}: {s[:3]}" for u, targets in graph.items() for t, s in targets.items()
             if (t == "caraserve_router.frontend" and u != "caraserve_router.api_server")
             or (u.startswith("caraserve_router") and t == "lightllm_patches")
             or (u == "kernels")
             or (u == "caraserve_router.frontend" and t == "caraserve_router.lora")]
    assert found == [], found


def test_no_python_file_over_600_lines():
    long = []
    for folder in (*PACKAGES, "scripts", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").count("\n")
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(REPO)}: {lines}")
    assert long == [], long


def test_the_scripts_the_docs_name_exist():
    """A moved script leaves no stale command behind (`python scripts/bench_X.py`) in the docs,
    the scripts' own usage lines, the packages' comments or the Makefile."""
    stale = []
    sources = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]
    for folder in (*PACKAGES, "scripts"):  # (tests name made-up scripts of their own)
        sources += sorted((REPO / folder).rglob("*.py")) + sorted((REPO / folder).rglob("*.sh"))
    for doc in sources:
        text = doc.read_text(encoding="utf-8")
        for path in sorted(set(re.findall(r"(?<![\w/.])scripts/[\w/]+\.(?:py|sh)\b", text))):
            if not (REPO / path).is_file():
                stale.append(f"{doc.relative_to(REPO)}: {path}")
    assert stale == [], stale
