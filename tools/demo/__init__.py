"""The end-to-end demo and its figures (overlays, pre-training figures)."""
