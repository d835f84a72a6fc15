"""The front end's side of the instance key (`contracts/instance_auth.py` has the instance's).

One key per cluster: given in the front end's environment (`CARASERVE_INSTANCE_KEY`, e.g. from
a Kubernetes Secret, needed when instances were started by hand for `--instance-urls`), else
generated at start. Under Ray it is kept in the cluster's key-value store under the front end's
namespace, so a front end attaching to running instances (`--ray-attach`) finds the key they
were started with; whoever can connect to the Ray cluster can read it, as they can run code on
every node anyway.
"""
from __future__ import annotations

import logging
import os

from caraserve_router.contracts.instance_auth import INSTANCE_KEY_ENV, auth_headers, new_key

RAY_KEY_NAME = b"caraserve/instance_key"
log = logging.getLogger("caraserve.auth")


def local_key() -> str:
    """The key of this front end's instances: given, or new."""
    return os.environ.get(INSTANCE_KEY_ENV, "") or new_key()


def use_key(session, key: str) -> None:
    """Send `key` with every request of `session` (the front end's session talks only to instances)."""
    session.headers.update(auth_headers(key))


def ray_key(namespace: str, attach: bool) -> str:
    """The key kept in Ray's KV store for `namespace`: the stored one when attaching (or when
    another front end of the namespace stored it first), else the given or a new one, stored.
    Call after `ray.init`."""
    from ray.experimental import internal_kv

    stored = internal_kv._internal_kv_get(RAY_KEY_NAME, namespace=namespace)
    if stored:
        if os.environ.get(INSTANCE_KEY_ENV, stored.decode()) != stored.decode():
            log.warning("%s differs from the instance key stored in Ray namespace %r; the stored one is used "
                        "(scripts/ray_down.py forgets it)", INSTANCE_KEY_ENV, namespace)
        return stored.decode()
    if attach:
        raise RuntimeError(f"no CaraServe instances to attach to in Ray namespace {namespace!r} (no instance key "
                           "stored there)")
    key = local_key()
    internal_kv._internal_kv_put(RAY_KEY_NAME, key.encode(), overwrite=False, namespace=namespace)
    # Another front end may have stored one in between: all of them use the one stored.
    return internal_kv._internal_kv_get(RAY_KEY_NAME, namespace=namespace).decode()


def forget_ray_key(namespace: str) -> None:
    """Remove the stored key (the namespace's instances are gone: scripts/ray_down.py)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(RAY_KEY_NAME, namespace=namespace)
