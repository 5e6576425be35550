"""Prefect flows and the `evomerge` CLI (installed as `evomerge.flows`)."""
