"""Serving many users: continuous batching over a slot pool (notebook 09)."""
