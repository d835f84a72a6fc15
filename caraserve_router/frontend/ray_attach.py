"""Finding, attaching to and reaping the instance actors of a Ray namespace.

Instance actors are detached and named `caraserve-instance<index>-g<generation>` in their
front end's namespace (`--ray-namespace`); a generation is one actor the front ends created for
that index (a new one after Ray gave up restarting the last). Any front end of the namespace
finds them by name: `--ray-attach` serves them as they are, `scripts/ray_down.py` stops them.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

log = logging.getLogger("caraserve.ray")

ACTOR_PREFIX = "caraserve-instance"
_NAME = re.compile(rf"^{ACTOR_PREFIX}(\d+)-g(\d+)$")


def actor_name(index: int, generation: int) -> str:
    return f"{ACTOR_PREFIX}{index}-g{generation}"


def parse_name(name: str) -> Optional[tuple[int, int]]:
    """(index, generation) of an instance actor's name, None for any other name."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def running_instances(namespace: str) -> dict[int, tuple[int, str]]:
    """index -> (generation, name) of the newest named instance actor of each index."""
    import ray

    newest: dict[int, tuple[int, str]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        parsed = parse_name(entry["name"]) if entry.get("namespace") == namespace else None
        if parsed is not None and parsed[1] >= newest.get(parsed[0], (-1, ""))[0]:
            newest[parsed[0]] = (parsed[1], entry["name"])
    return dict(sorted(newest.items()))


def reap(namespace: str, grace_s: float = 20.0) -> list[str]:
    """Stop every instance actor of `namespace` (each stops its instance and cleans up), kill
    the actors, and forget the namespace's instance key. Returns the names reaped."""
    import ray

    from caraserve_router.frontend.instance_auth import forget_ray_key

    names = [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
             if entry.get("namespace") == namespace and parse_name(entry["name"]) is not None]
    actors = []
    for name in names:
        try:
            actors.append(ray.get_actor(name, namespace=namespace))
        except ValueError:  # gone meanwhile
            pass
    refs = [actor.stop.remote() for actor in actors]
    try:
        ray.get(refs, timeout=grace_s)
    except Exception as e:  # noqa: BLE001 - dead or stuck: killed below either way
        log.warning("ray: not every instance stopped cleanly: %s", type(e).__name__)
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    forget_ray_key(namespace)
    return names
