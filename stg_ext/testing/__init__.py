"""Offline tiny pipelines of every supported family, for tests, the demo and examples (random weights)."""
