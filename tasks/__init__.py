"""Thin Prefect tasks around evomerge_core (installed as `evomerge.tasks`)."""
