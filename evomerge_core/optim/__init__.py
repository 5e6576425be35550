"""The optimizer: seeded CMA-ES ask/tell with a JSON-able state."""
