"""LoraRuntime: everything LoRA inside one model worker (placeholder: base model only)."""
from __future__ import annotations

import torch

from .adapter_store import AdapterError, AdapterStore
from .shapes import ModelShapes


class LoraRuntime:
    CONTROL_METHODS = ("register", "unregister", "list", "admit", "stats")

    def __init__(self, config, model):
        self.config = config
        self.model = model
        shapes = ModelShapes.from_config(model.config)
        self.store = AdapterStore(shapes, model.data_type, config.shm_prefix, config.lora.max_rank,
                                  pin=model.device.type == "cuda")
        self.request_adapter: dict[int, str] = {}

    def register(self, name, path):
        return self.store.add(name, path).spec.info()

    def unregister(self, name):
        self.store.remove(name)
        return True

    def list(self):
        return {n: self.store.get(n).spec.info() for n in self.store.names()}

    def admit(self, adapter):
        return adapter in self.store

    def stats(self):
        return {"resident": [], "registered": self.store.names()}

    def attach_request(self, r_id, adapter):
        if adapter is not None:
            self.request_adapter[r_id] = adapter

    def detach_request(self, r_id):
        self.request_adapter.pop(r_id, None)

    def build_batch(self, reqs, kwargs):
        if any(r.r_id in self.request_adapter for r in reqs):
            raise NotImplementedError("LoRA batches are not wired yet")
        return None

    def shutdown(self):
        self.store.close()
