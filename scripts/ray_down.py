#!/usr/bin/env python
"""Stop every CaraServe instance of a Ray namespace (the detached instance actors that front
ends started with `--cluster ray`), and forget the namespace's instance key.

    python scripts/ray_down.py --address HEAD:6379 --namespace caraserve

Each actor stops its instance (SIGTERM: it ends its children and removes its /dev/shm files),
then is killed for good (no restart). Front ends still attached lose their instances.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caraserve_router.frontend.ray_config import require_ray  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the Ray cluster (HOST:PORT as `ray start --head` prints)")
    parser.add_argument("--namespace", default="caraserve", help="the front ends' --ray-namespace")
    parser.add_argument("--grace-s", type=float, default=20.0, help="how long instances may take to stop")
    args = parser.parse_args(argv)
    try:
        require_ray()
    except ValueError as e:
        print(f"ray_down: error: {e}", file=sys.stderr)
        return 2
    import ray

    from caraserve_router.frontend.ray_attach import reap

    ray.init(address=args.address, namespace=args.namespace, logging_level=logging.WARNING)
    try:
        names = reap(args.namespace, args.grace_s)
    finally:
        ray.shutdown()
    print(f"stopped {len(names)} instance actor(s) in namespace {args.namespace!r}: {', '.join(names) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
