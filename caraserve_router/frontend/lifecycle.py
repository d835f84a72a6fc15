"""Running the front end: prepare the model, start the instances, serve HTTP, stop cleanly."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from caraserve_router.frontend.config import FrontendConfig, parse_configs
from caraserve_router.frontend.tp_capacity import check_tp_capacity

from caraserve_router.frontend.service import FrontEnd

log = logging.getLogger("caraserve.api")


def prepare_model(front_cfg: FrontendConfig, max_context: int | None = None) -> None:
    """Check --model-dir, or prepare the default model once (cached under .cache/).
    `max_context`: the instances' longest request (a shorter sliding window is refused)."""
    from caraserve_router.assets.model_prep import prepare_default_model, validate_model_dir

    if front_cfg.model_dir:
        validate_model_dir(front_cfg.model_dir, max_context=max_context)
    else:
        start = time.monotonic()
        print("preparing the default model (SmolLM2-135M-Instruct; the first time takes about a minute) ...",
              flush=True)
        front_cfg.model_dir = str(prepare_default_model())
        print(f"default model ready in {time.monotonic() - start:.0f} s: {front_cfg.model_dir}", flush=True)
    front_cfg.model_dir = os.path.abspath(front_cfg.model_dir)


async def serve(front: FrontEnd) -> None:
    from caraserve_router.frontend.app import build_app
    from caraserve_router.frontend.shutdown import QuietServer, Shutdown
    import uvicorn

    from caraserve_router.contracts.processes import bind_listening

    config = front.config
    # Bound before any instance starts, and held: a busy port is refused at once (not after the
    # instances' start-up), and no process can take it meanwhile; the instances choose their own
    # internal ports while starting, and one of those had taken the front end's port before it
    # was bound (a bench_modes run died of "address already in use" that way).
    try:
        listener = bind_listening(config.host, config.port, scan=1)
    except OSError as e:
        raise OSError(f"cannot serve on {config.host}:{config.port} (--host / --port): {e}") from None
    config.port = listener.getsockname()[1]  # --port 0: the one the OS gave
    # The graceful part of uvicorn's shutdown waits for in-flight requests; ours ends them with
    # an error at half the timeout, so this only bounds what remains.
    server = QuietServer(uvicorn.Config(build_app(front), host=config.host, port=config.port, log_level="warning",
                                        timeout_keep_alive=5, timeout_graceful_shutdown=config.shutdown_timeout_s / 2 + 2))
    shutdown = Shutdown(front, server, config.shutdown_timeout_s)
    shutdown.install()  # a signal during start-up also ends within the timeout
    try:
        await front.start()
        if shutdown.started_at is None:
            await server.serve(sockets=[listener])
    except asyncio.CancelledError:
        log.warning("start-up interrupted")
    finally:
        shutdown.begin("stopping", interrupt_start=False)
        await front.stop(grace_s=max(1.0, shutdown.remaining_s() - 2.0))
        listener.close()


def main(argv=None, description: str = "") -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        front_cfg, template = parse_configs(argv, description)
        front_cfg.validate()
        logging.getLogger().setLevel(front_cfg.log_level.upper())
        prepare_model(front_cfg, max_context=template.max_req_total_len)
        template.model_dir = front_cfg.model_dir
        template.lora.validate()
        # a --tp this host cannot hold is refused here, before any instance starts
        check_tp_capacity(template, front_cfg.instances, front_cfg.share_gpus, local=front_cfg.cluster == "local")
        if front_cfg.perf_model:  # profiled per TP size: one of another size is refused now, not later
            from caraserve_router.frontend.perf_bootstrap import check_tp
            from caraserve_router.scheduling.perf_model import PerfModel

            check_tp(PerfModel.load(front_cfg.perf_model), template.tp, front_cfg.perf_model)

        uvloop.run(serve(FrontEnd(front_cfg, template)))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"caraserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
