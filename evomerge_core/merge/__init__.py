"""Merge library: a registry of pure tensor merge methods (`methods`), recipes (`recipe`),
parameter resolution per tensor/layer (`params`) and the engine applying a recipe to whole
models (`engine`: streamed to disk, or in place into a resident model)."""
