"""CaraServe: CPU-assisted, rank-aware multi-LoRA serving on a patched LightLLM."""
from setuptools import find_packages, setup

setup(
    name="caraserve",
    version="0.1.0",
    description="CPU-assisted and rank-aware LoRA serving (CaraServe / Toppings) on LightLLM 0.0.1",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lightllm_patches*", "caraserve_router*", "kernels*"]),
    # Exact pins live in constraints.txt; `make setup` installs with `-c constraints.txt`.
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
