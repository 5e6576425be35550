"""The evaluation budget of a search (`fitness.budget`, off by default): racing candidates
inside a generation, informative item subsets fitted on calibration results, and per-item
generation length caps. Pure decisions on per-item results (no model, no Prefect); the evolve
flow maps the evaluations. See docs/budget.md."""
