#!/usr/bin/env python3
"""What `make setup` checks about the environment it installs into (stdlib only).

    python scripts/check_install.py kernels   # refuse a foreign top-level `kernels` (exit 2)
    python scripts/check_install.py lock      # installed distributions == the lock (exit 1)
    python scripts/check_install.py lockfile  # print the lock file for this interpreter

The lock (`lock/cp3XY.txt`, written by `make lock` with uv) pins every distribution set-up
installs, transitive ones included, for one CPython on Linux x86-64. `make setup` installs it
with `--no-deps`, so what is installed is exactly what is listed. Two things are not in it:
the editable `caraserve` itself and the venv's own bootstrap (`pip`, `setuptools`, which come
with the interpreter's `ensurepip`).

`kernels`: CaraServe's top-level package `kernels/` (the LoRA kernels) has the same import
name as Hugging Face's PyPI distribution `kernels`. Both cannot be imported in one
interpreter; an environment that holds the other one is refused here and in setup.py, with
what to do (docs/INSTALL.md).
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK_DIR = REPO / "lock"
OURS = "caraserve"
# Installed by `python -m venv` itself (ensurepip): checked against the lock only where it pins them.
BOOTSTRAP = {"pip", "setuptools", "wheel"}
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)")
_REQ_NAME = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)")

KERNELS_MESSAGE = """\
CaraServe's top-level package `kernels` (its LoRA kernels) collides with the distribution
{dists} installed in {prefix}, which also provides a top-level `kernels` (Hugging Face's
hub-kernels package is the known one). One interpreter cannot import both.
Install CaraServe into a fresh virtual environment without it, e.g.:
    rm -rf .venv && make setup
or remove it from this one:  {python} -m pip uninstall {names}
If you need Hugging Face's `kernels` too, keep it in a separate environment (docs/INSTALL.md)."""


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_file(version_info=sys.version_info) -> Path:
    return LOCK_DIR / f"cp{version_info[0]}{version_info[1]}.txt"


def read_lock(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and blank lines skipped)."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[normalize(match["name"])] = match["version"]
    return pins


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(normalize(_REQ_NAME.match(line)["name"]))
    return names


def environment_dists():
    """The distributions installed in this interpreter's environment (its site-packages), not
    whatever else `sys.path` may hold at the time (a test or a .pth can add folders to it)."""
    paths = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    return metadata.distributions(path=paths)


def installed(dists=None) -> dict[str, str]:
    """name -> version of every distribution installed in this environment but ours."""
    found = {}
    for dist in dists if dists is not None else environment_dists():
        name = normalize(dist.metadata["Name"] or "")
        if name and name != OURS:
            found[name] = dist.version
    return found


def lock_problems(have: dict[str, str], lock: dict[str, str], required: set[str]) -> list[str]:
    """Every way `have` (installed) differs from `lock`, and requirements the lock lacks.
    The venv's bootstrap (BOOTSTRAP) counts only where the lock pins it."""
    problems = []
    for name, version in sorted(have.items()):
        if name in BOOTSTRAP and name not in lock:
            continue
        if name not in lock:
            problems.append(f"{name}=={version} is installed but not in the lock")
        elif lock[name] != version:
            problems.append(f"{name} is {version}, the lock pins {lock[name]}")
    problems += [f"{name}=={v} is in the lock but not installed" for name, v in sorted(lock.items())
                 if name not in have]
    problems += [f"requirements.txt names {name}, which the lock lacks" for name in sorted(required - set(lock))]
    return problems


def provides_kernels(dist) -> bool:
    """Whether a distribution ships a top-level `kernels` package or module."""
    top = dist.read_text("top_level.txt")
    if top and "kernels" in top.split():
        return True
    return any(str(f).split("/")[0] in ("kernels", "kernels.py") for f in (dist.files or ()))


def foreign_kernels(dists=None) -> list[str]:
    """Distributions other than ours that provide a top-level `kernels`."""
    return sorted({f"{dist.metadata['Name']}=={dist.version}"
                   for dist in (dists if dists is not None else metadata.distributions())
                   if normalize(dist.metadata["Name"] or "") != OURS and provides_kernels(dist)})


def kernels_message(dists: list[str]) -> str:
    return KERNELS_MESSAGE.format(dists=", ".join(dists), names=" ".join(d.split("==")[0] for d in dists),
                                  prefix=sys.prefix, python=sys.executable)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    if command == "kernels":
        foreign = foreign_kernels()
        if foreign:
            print(f"error: {kernels_message(foreign)}", file=sys.stderr)
            return 2
        return 0
    if command == "lockfile":
        print(lock_file().relative_to(REPO))
        return 0 if lock_file().exists() else 1
    if command == "lock":
        path = lock_file()
        if not path.exists():
            print(f"error: no lock for Python {sys.version_info[0]}.{sys.version_info[1]} ({path.name}); "
                  f"locks exist for: {', '.join(p.stem for p in sorted(LOCK_DIR.glob('cp*.txt')))}",
                  file=sys.stderr)
            return 1
        problems = lock_problems(installed(), read_lock(path), requirement_names(REPO / "requirements.txt"))
        for problem in problems:
            print(f"lock check: {problem}", file=sys.stderr)
        if problems:
            print(f"lock check: the environment differs from {path.relative_to(REPO)}: "
                  f"rm -rf .venv && make setup (or `make lock` after changing requirements.txt)", file=sys.stderr)
            return 1
        print(f"lock check ok: {len(read_lock(path))} distributions as {path.relative_to(REPO)} pins them")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
