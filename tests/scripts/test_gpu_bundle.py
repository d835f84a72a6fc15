"""scripts/gpu_bundle.py: the import walk, the need it computes, and the bundle folder.

The logic is always tested on synthetic trees and metadata (no network). The real bundle is
checked in the repo's `.whl/` when it exists; otherwise it is built into a temporary folder
when pip can reach the package index, and the size check is skipped (with the reason) when not.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts" / "gpu_bundle.py")
gb = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_bundle", gb)  # dataclasses look their module up by name
_spec.loader.exec_module(gb)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_import_walk_keeps_third_party_names_only(tmp_path):
    _write(tmp_path / "caraserve_router" / "a.py", "import os, json\nimport zmq.asyncio\nfrom PIL import Image\n"
           "from . import b\nfrom caraserve_router.lora import x\nimport kernels\n"
           "def f():\n    import fastapi\n")
    _write(tmp_path / "scripts" / "tool.py", "import helper\nimport numpy as np\n")
    _write(tmp_path / "scripts" / "helper.py", "import lightllm.models\n")
    _write(tmp_path / "setup.py", "from setuptools import setup\n")
    found = gb.project_imports(tmp_path)
    assert set(found) == {"zmq", "PIL", "fastapi", "numpy", "lightllm", "setuptools"}
    assert found["zmq"] == {"caraserve_router/a.py"}
    assert found["lightllm"] == {"scripts/helper.py"}


def test_need_maps_imports_closes_over_requires_and_subtracts_the_device():
    provided = {"zmq": ["pyzmq"], "fancy_pkg": ["Fancy.Pkg"], "numpy": ["numpy"], "torch": ["torch"]}
    requires = {
        "pyzmq": ["cffi; implementation_name == 'pypy'"],
        "fancy-pkg": ["numpy>=1", "old-backport; python_version < '3.11'", "docs-only; extra == 'docs'",
                      "Inner_Dep>=2", "torch"],
        "inner-dep": [],
        "from-requirements": ["pyzmq"],
        "typing-extensions": [],
    }
    imports = {"zmq": {"a.py"}, "fancy_pkg": {"b.py"}, "numpy": {"c.py"}, "torch": {"d.py"}}
    need = gb.compute_need(imports, ["From_Requirements"], device={"numpy", "torch", "typing-extensions"},
                           provided=provided, version_of=lambda d: "1.0", requires_of=lambda d: requires[d])
    assert set(need.wheels) == {"pyzmq", "fancy-pkg", "inner-dep", "from-requirements", "typing-extensions"}
    assert need.on_device == {"numpy"}
    assert set(need.skipped) == {"torch"}  # NOT_BUNDLED wins over everything
    assert need.why["inner-dep"] == "required by fancy-pkg"
    assert need.why["pyzmq"].startswith("import zmq")


def test_an_import_nothing_provides_is_an_error():
    with pytest.raises(gb.UnmappedImport, match="nosuchthing"):
        gb.compute_need({"nosuchthing": {"x.py"}}, [], device=set(), provided={})


def test_check_folder_reports_every_problem(tmp_path):
    need = gb.Need(wheels={"lightllm": "0.0.1", "rpyc": "6.0.2", "pyzmq": "27.3.0"}, why={"rpyc": "x"})
    for name in ("lightllm-0.0.1-py3-none-any.whl", "pyzmq-27.2.0-cp312-abi3-manylinux_2_28_x86_64.whl",
                 "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", "extra_thing-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"w" * 10)
    problems = gb.check_folder(tmp_path, need, device={"torch"}, limit=30)
    text = "\n".join(problems)
    assert "missing rpyc==6.0.2" in text
    assert "pyzmq: bundle holds ['27.2.0'], the project is tested with 27.3.0" in text
    assert "torch is on the device and must not be replaced" in text
    assert "extra-thing is not needed" in text
    assert "over the 0 MiB limit" in text
    assert gb.check_folder(tmp_path / "absent", need, set()) == [f"{tmp_path / 'absent'} does not exist: run `make gpu-bundle`"]


def test_project_need_covers_every_third_party_import():
    """The real walk: every import maps to a distribution that is bundled, on the device, or
    deliberately left out; LightLLM and what it imports undeclared are bundled, torch is not."""
    device = gb.device_packages()
    need = gb.project_need(device)
    for name, files in gb.project_imports().items():
        dist = gb.distribution_of(name)
        assert dist in need.wheels or dist in need.on_device or dist in need.skipped, (name, sorted(files))
    for dist in ("lightllm", "fastapi", "uvicorn", "rpyc", "pyzmq", "pydantic", "pydantic-core", "gguf"):
        assert dist in need.wheels, dist
    assert not {"torch", "triton"} & set(need.wheels)
    assert "torch" in device and "triton" in device and "lightllm" not in device


def _pypi_reachable(tmp_path: Path) -> str | None:
    """None when pip downloads one small wheel; else why not."""
    cmd = gb.pip_download_command(tmp_path, ["annotated-types==0.8.0"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return "pip download timed out"
    return None if proc.returncode == 0 else f"pip download failed: {proc.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(folder, None) of a complete bundle -- the repo's .whl/ when present, else one built into a
    temporary folder -- or (None, why not) when there is none and the index is unreachable."""
    if gb.DEFAULT_DIR.is_dir():
        return gb.DEFAULT_DIR, None
    tmp = tmp_path_factory.mktemp("gpu-bundle")
    why_not = _pypi_reachable(tmp / "probe")
    if why_not:
        return None, f"no {gb.DEFAULT_DIR.name}/ here and the package index is unreachable ({why_not})"
    gb.build(tmp / "whl", gb.project_need(), timeout=300)
    return tmp / "whl", None


def test_bundle_is_complete_and_under_40_mib(bundle):
    folder, why_not = bundle
    if folder is None:
        pytest.skip(why_not + "; the bundle's logic is tested above")
    device = gb.device_packages()
    assert gb.check_folder(folder, gb.project_need(device), device) == []
    assert sum(p.stat().st_size for p in folder.iterdir()) < gb.SIZE_LIMIT_BYTES
    assert (folder / gb.MANIFEST).is_file(), "make gpu-bundle writes MANIFEST.json"


def test_cli_need_lists_lightllm():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "need"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "lightllm==0.0.1" in proc.stdout and "# not bundled: torch" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the GPU run is not a CI test")
def test_gpu_check_dry_run_on_the_cpu(bundle, tmp_path):
    """scripts/gpu_check.sh without CUDA: the bundle installs for CPython 3.12, every module
    imports, `pytest -m cuda` collects and skips every test, the benchmark runs on tiny shapes;
    exit 0, and the files under $OUT say so."""
    folder, why_not = bundle
    if folder is None:
        pytest.skip(why_not)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_BUNDLE_DIR=str(folder),
               GPU_SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert "no CUDA device here" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda"] is False and summary["ok"] is True
    assert summary["exit"] == {"install": 0, "imports": 0, "pytest": 0, "bench": 0}
    assert json.loads((out / "imports.json").read_text())["failed"] == {}
    bench = json.loads((out / "bench_gpu.json").read_text())
    assert bench["emulated"] is True and bench["link"] == "emulated"
    assert {"kernels", "steps", "coldstart", "sidecar"} <= set(bench)
    assert set(bench["coldstart"]) == {"cached", "on-demand", "pipeline", "cpu-assist"}
    # every kernel path computed what the per-adapter loop computes (fp32 on the CPU)
    errors = [err for row in bench["kernels"] for err in row["rel_error_vs_loop"].values()]
    assert errors and max(errors) < 1e-4, errors
    assert bench["coldstart"]["cpu-assist"]["counters"]["loads_cold"] >= 1
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench_gpu.json", "check.log", "env.json", "imports.json", "pytest_cuda.xml", "summary.json"]


def test_bundle_versions_come_from_the_device_lock():
    pins = gb.lock_versions()
    need = gb.project_need(gb.device_packages())
    assert need.wheels, "the bundle needs something"
    for dist, version in need.wheels.items():
        assert pins[dist] == version, dist
    with pytest.raises(LookupError, match="does not pin it"):
        gb.locked_version_of({})("anything")
