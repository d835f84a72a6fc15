"""No code of the project pins a GPU: every tensor goes to the configured device (an instance
sees its own GPU as `cuda` through CUDA_VISIBLE_DEVICES; the Ray actor gets it from Ray), so a
literal `cuda:0`, `device="cuda"` or a bare `.cuda()` is a bug on a multi-GPU host."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("caraserve_router", "lightllm_patches", "kernels", "scripts")
FIXED_INDEX = re.compile(r"\bcuda:\d")


def _docstrings(tree: ast.AST) -> set:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def fixed_devices(source: str, filename: str) -> list[str]:
    """`file:line: what` for every pinned device in `source` (docstrings and comments excepted)."""
    tree = ast.parse(source, filename=filename)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if FIXED_INDEX.search(node.value):
                found.append(f"{filename}:{node.lineno}: literal {node.value!r}")
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "device" and isinstance(kw.value, ast.Constant) and kw.value.value == "cuda":
                    found.append(f"{filename}:{node.lineno}: device=\"cuda\" instead of the configured device")
            if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args:
                found.append(f"{filename}:{node.lineno}: .cuda() instead of .to(configured device)")
    return found


def test_the_check_finds_pinned_devices():
    source = ('"""cuda:0 in a docstring is fine"""\n'
              'a = torch.zeros(3, device="cuda")\nb = x.cuda()\nc = torch.device("cuda:1")\n'
              'd = x.to(device)\ne = torch.zeros(3, device=device)\n')
    found = fixed_devices(source, "m.py")
    assert sorted(int(f.split(":")[1]) for f in found) == [2, 3, 4], found


def test_no_code_pins_a_gpu():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found += fixed_devices(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert found == [], "\n".join(found)
