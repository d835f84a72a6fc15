"""The install: the environment equals the lock, and `kernels` is always CaraServe's.

The lock test reads this interpreter's `lock/cp3XY.txt` and every installed distribution
(importlib.metadata): what `make setup` installed must be exactly what the lock pins, and
every name in requirements.txt must be locked. The `kernels` tests start real processes of
ours from a working directory holding a decoy `kernels/` package that raises on import.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_install", REPO / "scripts" / "check_install.py")
ci = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ci)


class _Dist:
    """The slice of importlib.metadata.Distribution that check_install reads."""

    def __init__(self, name, version, top_level=None, files=()):
        self.metadata = {"Name": name}
        self.version = version
        self._top = top_level
        self.files = list(files)

    def read_text(self, filename):
        return self._top if filename == "top_level.txt" else None


def test_environment_equals_the_lock():
    lock_path = ci.lock_file()
    assert lock_path.exists(), f"no lock for this interpreter: {lock_path.name}"
    problems = ci.lock_problems(ci.installed(), ci.read_lock(lock_path), ci.requirement_names(REPO / "requirements.txt"))
    assert problems == [], "\n".join(problems)


def test_every_lock_pins_every_requirement_exactly():
    required = ci.requirement_names(REPO / "requirements.txt")
    locks = sorted((REPO / "lock").glob("cp3*.txt"))
    assert [p.stem for p in locks] == ["cp311", "cp312"]
    for path in locks:
        pins = ci.read_lock(path)
        assert required <= set(pins), f"{path.name} lacks {sorted(required - set(pins))}"
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(lines) == len(pins), f"{path.name}: a line that is not name==version"
        # the collision this lock exists to keep out, and the CPU build on the dev/CI Python
        assert "kernels" not in pins
    assert ci.read_lock(REPO / "lock" / "cp311.txt")["torch"].endswith("+cpu")


def test_lock_problems_names_each_difference():
    lock = {"a": "1.0", "b": "2.0", "setuptools": "80.0"}
    have = {"a": "1.0", "b": "2.1", "c": "3.0", "pip": "23.2", "setuptools": "65.5"}
    problems = ci.lock_problems(have, lock, required={"a", "d"})
    assert problems == [
        "b is 2.1, the lock pins 2.0",
        "c==3.0 is installed but not in the lock",
        "setuptools is 65.5, the lock pins 80.0",
        "requirements.txt names d, which the lock lacks",
    ]
    assert ci.lock_problems({"a": "1.0"}, {"a": "1.0", "e": "1"}, set()) == ["e==1 is in the lock but not installed"]


def test_a_foreign_top_level_kernels_is_found():
    dists = [_Dist("caraserve", "0.1.0", "caraserve_router\nkernels\n"),
             _Dist("kernels", "0.19.1", None, ["kernels/__init__.py", "kernels/_internals/x.py"]),
             _Dist("other", "1.0", "other\n", ["other/__init__.py"]),
             _Dist("Sneaky_Pkg", "2.0", "kernels\n")]
    assert ci.foreign_kernels(dists) == ["Sneaky_Pkg==2.0", "kernels==0.19.1"]
    message = ci.kernels_message(["kernels==0.19.1"])
    assert "pip uninstall kernels" in message and "docs/INSTALL.md" in message
    assert ci.foreign_kernels() == []  # this environment holds none


def test_setup_refuses_an_environment_with_a_foreign_kernels(tmp_path):
    """setup.py stops with the message before setuptools runs, when a distribution providing a
    top-level `kernels` is installed (here a fake dist-info on PYTHONPATH)."""
    site = tmp_path / "site"
    info = site / "kernels-0.19.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\n")
    (info / "top_level.txt").write_text("kernels\n")
    proc = subprocess.run([sys.executable, str(REPO / "setup.py"), "--name"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    said = " ".join(proc.stderr.split())
    assert "collides with the distribution kernels==0.19.1" in said
    assert "make setup" in said


def _decoy_cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "work"
    (cwd / "kernels").mkdir(parents=True)
    (cwd / "kernels" / "__init__.py").write_text("raise ImportError('the decoy kernels package was imported')\n")
    return cwd


# Each of our process kinds' entry module, imported as its process does, then a use of kernels.
ENTRY_MODULES = ["caraserve_router.api_server", "lightllm_patches.instance", "lightllm_patches.instance_server",
                 "caraserve_router.lora.batch"]


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_kernels_resolves_to_ours_from_any_working_directory(tmp_path, module):
    """`python -c` puts the working directory first on sys.path; a decoy `kernels/` there
    must not be what our processes import."""
    code = textwrap.dedent(f"""
        import importlib, sys
        importlib.import_module({module!r})
        import kernels, kernels.cpu
        print(kernels.__file__)
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=_decoy_cwd(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == REPO / "kernels" / "__init__.py"


def test_sidecar_worker_and_scripts_import_our_kernels(tmp_path):
    """A sidecar worker is a spawned process (multiprocessing `spawn`): it re-imports its module
    in a fresh interpreter. A script runs by path. Both from the decoy directory."""
    code = textwrap.dedent("""
        import multiprocessing as mp
        import caraserve_router.lora  # noqa: F401  (what the instance has imported before it spawns)

        def child(q):
            import kernels
            q.put(kernels.__file__)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start()
            print(q.get(timeout=60))
            p.join(timeout=60)
        """)
    cwd = _decoy_cwd(tmp_path)
    (cwd / "spawn_check.py").write_text(code)
    proc = subprocess.run([sys.executable, "spawn_check.py"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == REPO / "kernels" / "__init__.py"
    script = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "decode_kernels.py"), "--help"], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr[-2000:]


def test_transformers_does_not_take_our_kernels_for_hugging_faces():
    """transformers imports Hugging Face's `kernels` only when `is_kernels_available()`: it finds
    the name, then reads the version of the distribution that provides it (ours: `caraserve`)
    and wants [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION). Our version must stay outside, or
    transformers would `from kernels import get_kernel` and get our package."""
    from transformers.utils import import_utils

    assert import_utils.is_kernels_available() is False
    assert import_utils.is_flash_attn_2_available(kernels_fallback_ok=True) is False
