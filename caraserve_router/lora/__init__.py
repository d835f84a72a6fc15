"""Multi-LoRA serving: host adapter store, device pool, host->device link, CPU sidecar, modes."""
