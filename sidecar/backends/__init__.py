"""Backend adapters: what the sidecar learns from the Triton servers it fronts."""
