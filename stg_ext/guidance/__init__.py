"""Guidance: STG on stock pipelines and denoisers (sessions, drivers, pipeline specs, the loop tracker), the
diffusers guider, and restart sampling. See docs/design.md for the way of one step through these modules."""
