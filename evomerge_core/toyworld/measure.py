"""Measurements for docs/toyworld.md and the tests: accuracy of each source model and of a few
fixed merges on the zoo's tasks.

The merge here is plain weighted task arithmetic on state dicts (base + sum_i w_i * (expert_i -
base)), kept deliberately tiny and local so the toy world does not depend on the merge engine.

    python -m evomerge_core.toyworld.measure --size micro --split test
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

import torch

from .evaluate import evaluate_exact_match, load_model, load_tokenizer
from .zoo import TASK_NAMES, Zoo, build_zoo

# A few fixed merges of the experts reported in the docs: name -> weights per expert.
FIXED_MERGES: dict[str, dict[str, float]] = {
    "ta skill_a+lang (1.0, 1.0)": {"skill_a": 1.0, "lang": 1.0},
    "ta skill_a+lang (0.7, 0.7)": {"skill_a": 0.7, "lang": 0.7},
    "ta skill_a+lang (0.5, 0.5)": {"skill_a": 0.5, "lang": 0.5},
    "ta all three (0.5, 0.5, 0.5)": {"skill_a": 0.5, "skill_b": 0.5, "lang": 0.5},
}


def task_arithmetic(
    base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """base + sum_i weights[i] * (experts[i] - base), tensor by tensor."""
    merged = {}
    for key, b in base.items():
        delta = sum(w * (experts[name][key] - b) for name, w in weights.items())
        merged[key] = b + delta
    return merged


def merged_model(zoo: Zoo, weights: Mapping[str, float]) -> torch.nn.Module:
    """The base model with the weighted task vectors of the named experts added."""
    model = load_model(zoo.models["base"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {name: load_model(zoo.models[name]).state_dict() for name in weights}
    model.load_state_dict(task_arithmetic(base, experts, weights))
    return model.eval()


def accuracy_table(zoo: Zoo, split: str, merges: Mapping[str, Mapping[str, float]] = FIXED_MERGES) -> dict[str, dict[str, float]]:
    """model or merge name -> task -> exact-match accuracy on `split`."""
    tokenizer = load_tokenizer(zoo.models["base"])
    rows = {task: zoo.rows(task, split) for task in TASK_NAMES}
    candidates = {name: load_model(path) for name, path in zoo.models.items()}
    candidates.update({name: merged_model(zoo, w) for name, w in merges.items()})
    return {
        name: {task: evaluate_exact_match(model, tokenizer, rows[task]) for task in TASK_NAMES}
        for name, model in candidates.items()
    }


def markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(TASK_NAMES) + " |", "|---|" + "---|" * len(TASK_NAMES)]
    for name, accs in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{accs[t]:.3f}" for t in TASK_NAMES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="micro")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    zoo = build_zoo(args.size)
    table = accuracy_table(zoo, args.split)
    print(json.dumps(table, indent=2) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
