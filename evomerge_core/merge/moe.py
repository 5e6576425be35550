"""Mixture-of-experts checkpoints (Mixtral and the like) stored one tensor per expert.

mergekit 0.1.5 merges such a model in the transformers 5 layout, where each layer's experts are
fused into one tensor (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). The methods whose
result depends on statistics of the whole tensor (TIES's top-k trim and SLERP's angle) therefore
see all experts at once there, but a single expert here, and the results differ. Element-wise
methods (linear, task_arithmetic, and TIES at density 1) give the same values either way. Rather
than silently produce a different model, such merges are refused.
"""

from __future__ import annotations

import re
from typing import Iterable

from evomerge_core.errors import MergeError
from evomerge_core.merge.params import MergePlan, resolve_tensor_params
from evomerge_core.merge.sparsify import Sparsification

_PER_EXPERT_RE = re.compile(r"\.experts\.\d+\.")


def is_per_expert(tensor_name: str) -> bool:
    """True for a tensor of one expert (`...block_sparse_moe.experts.3.w1.weight`)."""
    return _PER_EXPERT_RE.search(tensor_name) is not None


def check_expert_merge(plan: MergePlan, tensor_names: Iterable[str], num_layers: int) -> None:
    """MergeError when the recipe would trim by magnitude (TIES, density < 1) or slerp (0 < t < 1) expert
    tensors stored one per expert, where mergekit works on the fused tensor."""
    variant = plan.method.task_vector
    trims = variant is not None and variant.sparsification is Sparsification.MAGNITUDE  # TIES's top-k trim
    if not trims and plan.method.name != "slerp":
        return
    for name in tensor_names:
        if not is_per_expert(name):
            continue
        global_params, model_params = resolve_tensor_params(plan, name, num_layers)
        if trims:
            bad = any(float(mp.get("density", 1.0)) < 1.0 for mp in model_params)
            what = "TIES with density < 1 trims the top-k of each tensor"
        else:
            bad = 0.0 < float(global_params["t"]) < 1.0
            what = "SLERP takes the angle between whole tensors"
        if bad:
            raise MergeError(
                f"{what}, and tensor {name} holds a single expert of a mixture-of-experts model, where mergekit "
                "works on all of the layer's experts fused into one tensor (the results would differ); "
                "set density: 1.0 for the expert tensors (a `filter: experts` entry) or use linear, "
                "task_arithmetic or dare_ties"
            )
