"""The global patches seen from a fresh process: what LightLLM's shared segments leave at exit,
and where an instance's caraserve log lines go."""
from __future__ import annotations

import subprocess
import sys
import uuid

from caraserve_router.contracts.processes import remove_shm

SCRIPT = """
import logging, sys
import lightllm_patches  # noqa: F401 - applies the global patches
from lightllm.server.router.dynamic_prompt.shared_arr import SharedInt
from lightllm_patches._global import set_log_level
from caraserve_router.contracts.processes import remove_shm

counter = SharedInt(sys.argv[1] + "_counter")
counter.set_value(7)
again = SharedInt(sys.argv[1] + "_counter")   # attached, as a second process of an instance would
assert again.get_value() == 7
set_log_level("info")
logging.getLogger("caraserve.lora.auto").info("auto: a choice")
counter.shm.close(); again.shm.close()
remove_shm(sys.argv[1])                        # the instance's own clean-up, by prefix
"""


def test_segments_removed_by_the_instance_raise_no_tracker_warning_and_info_reaches_stderr():
    prefix = f"cstest_global_{uuid.uuid4().hex[:8]}"
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, prefix], capture_output=True, text=True, timeout=120)
    finally:
        remove_shm(prefix)
    assert done.returncode == 0, done.stderr
    # upstream's segments were tracked: the tracker warned of "leaked" objects and tried to
    # unlink names the instance had already removed
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    # no root handler in this process: the caraserve logger has its own
    assert "INFO caraserve.lora.auto: auto: a choice" in done.stderr
