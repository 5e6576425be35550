"""The source pool: resolving sources to local snapshots, model families, merge checks."""
