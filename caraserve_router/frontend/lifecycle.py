"""Running the front end: prepare the model, start the instances, serve HTTP, stop cleanly."""
from __future__ import annotations

import logging
import os
import signal
import sys

from caraserve_router.contracts.processes import Terminated, raise_terminated
from caraserve_router.frontend.config import FrontendConfig, parse_configs
from caraserve_router.frontend.service import FrontEnd


def prepare_model(front_cfg: FrontendConfig) -> None:
    """Check --model-dir, or prepare the default model once (cached under .cache/)."""
    from caraserve_router.assets.model_prep import prepare_default_model, validate_model_dir

    if front_cfg.model_dir:
        validate_model_dir(front_cfg.model_dir)
    else:
        print("preparing the default model (SmolLM2-135M-Instruct) ...", flush=True)
        front_cfg.model_dir = str(prepare_default_model())
    front_cfg.model_dir = os.path.abspath(front_cfg.model_dir)


async def serve(front: FrontEnd) -> None:
    import uvicorn

    from caraserve_router.frontend.app import build_app

    try:
        await front.start()
        server = uvicorn.Server(uvicorn.Config(build_app(front), host=front.config.host, port=front.config.port,
                                               log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5))
        await server.serve()
    finally:
        await front.stop()


def main(argv=None, description: str = "") -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, raise_terminated)  # so `finally` stops the instances
    try:
        front_cfg, template = parse_configs(argv, description)
        front_cfg.validate()
        logging.getLogger().setLevel(front_cfg.log_level.upper())
        prepare_model(front_cfg)
        template.model_dir = front_cfg.model_dir
        template.lora.validate()
        uvloop.run(serve(FrontEnd(front_cfg, template)))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"caraserve: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated):
        pass
    return 0
