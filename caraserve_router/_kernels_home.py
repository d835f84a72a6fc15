"""`import kernels` means CaraServe's `kernels/` package in every CaraServe process.

Hugging Face publishes a PyPI distribution whose top-level package is also `kernels`, and any
directory named `kernels` in the working directory shadows an installed package for
`python -m ...` and `python -c ...`. Importing `caraserve_router` (every front end, instance,
sidecar worker and script does so before it touches the kernels) puts a finder first on
`sys.meta_path` that resolves the top-level name `kernels` to the package beside this one.
Submodules (`kernels.cpu`, ...) follow from the package's own `__path__`. Nothing is imported
here: the front end stays free of torch.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


class KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds only the top-level `kernels`, and only as CaraServe's package."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        return importlib.util.spec_from_file_location(
            "kernels", KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)])


def install() -> None:
    """Idempotent. Raises ImportError when another `kernels` was imported before us."""
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != KERNELS_DIR:
        raise ImportError(f"the module 'kernels' already imported is {getattr(loaded, '__file__', loaded)!r}, "
                          f"not CaraServe's {KERNELS_DIR}; see docs/INSTALL.md ('The kernels name')")
    if not any(isinstance(finder, KernelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, KernelsFinder())
