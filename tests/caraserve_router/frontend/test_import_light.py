"""The front-end process must not load torch or LightLLM: importing its entry point (and the
modules it runs on) in a fresh interpreter leaves them out of sys.modules."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "lightllm", "lightllm_patches", "triton", "transformers")


def test_api_server_import_loads_no_torch_or_lightllm():
    code = ("import json, sys\n"
            "import caraserve_router.api_server\n"
            "import caraserve_router.frontend.app, caraserve_router.frontend.service\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
