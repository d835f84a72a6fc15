"""CaraServe: CPU-assisted, rank-aware multi-LoRA serving on a patched LightLLM."""
import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup

# Refuse, with what to do, an environment where another distribution provides a top-level
# `kernels` (Hugging Face's): otherwise setuptools loads that distribution's entry points with
# this directory first on sys.path, finds our kernels/ instead, and fails deep in egg_info.
_spec = importlib.util.spec_from_file_location("check_install", Path(__file__).parent / "scripts" / "check_install.py")
_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_check)
if _check.foreign_kernels():
    sys.exit("error: " + _check.kernels_message(_check.foreign_kernels()))

setup(
    name="caraserve",
    version="0.1.0",
    description="CPU-assisted and rank-aware LoRA serving (CaraServe / Toppings) on LightLLM 0.0.1",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lightllm_patches*", "caraserve_router*", "kernels*"]),
    # Exact pins of everything live in lock/cp3XY.txt (`make lock`); `make setup` installs that.
    install_requires=[
        "torch==2.13.0",
        "triton==3.7.1",
        "lightllm==0.0.1",
        "prometheus_client", "fastapi", "uvicorn", "psutil", "sortedcontainers", "requests",
        "pillow", "pyzmq", "rpyc", "uvloop", "einops", "numpy", "safetensors",
        "gguf", "transformers", "accelerate", "peft", "aiohttp", "httpx", "matplotlib", "ray==2.60.0",
    ],
    entry_points={
        "console_scripts": [
            "caraserve-server=caraserve_router.api_server:main",
            "caraserve-instance=lightllm_patches.instance:main",
        ]
    },
)
