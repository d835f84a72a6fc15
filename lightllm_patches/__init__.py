"""CaraServe's patch set on LightLLM 0.0.1.

Importing this package applies, once, the few *global* patches that must be in place before
LightLLM's own modules are imported (see `_global.py`). Everything else is a subclass in a
module of this package; each names the upstream class or function it overrides and why.
Every CaraServe process (instance HTTP server, router / model worker, detokenizer, CPU
sidecar) imports this package before anything from `lightllm`.
"""
from lightllm_patches._global import apply_global_patches

apply_global_patches()
