"""evomerge_core: the Prefect-free library behind evomerge (merge engine, search spaces,
fitness, optimizer, run store, toy world). Usable from a notebook without a Prefect API."""

__version__ = "0.1.0"
