"""Benchmark-contamination guard: selecting a model on a known benchmark's evaluation split
makes that benchmark's score meaningless, so an evolve run whose *selection* data (the fitness
dataset) is such a split is refused unless the config says ``fitness.allow_benchmark_test_split:
true``; the model card then says so. The held-out ``fitness.test`` split is never checked: scoring
on a benchmark's test split is what it is for.

Matching is by Hub dataset id (case-insensitive) and split name (``test``, ``test[:100]``,
``train+test`` all count as ``test``); for local files, a path whose file name names a known
benchmark and a test split (``gsm8k/test.jsonl``, ``mmlu_test.parquet``) counts too.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

from evomerge_core.errors import ConfigError

# Hub dataset id (lowercase) -> (benchmark name, splits used for evaluation).
KNOWN_BENCHMARKS: dict[str, tuple[str, frozenset[str]]] = {
    "gsm8k": ("GSM8K", frozenset({"test"})),
    "openai/gsm8k": ("GSM8K", frozenset({"test"})),
    "juletxara/mgsm": ("MGSM", frozenset({"test"})),
    "cais/mmlu": ("MMLU", frozenset({"test"})),
    "hendrycks_test": ("MMLU", frozenset({"test"})),
    "tiger-lab/mmlu-pro": ("MMLU-Pro", frozenset({"test"})),
    "hendrycks/competition_math": ("MATH", frozenset({"test"})),
    "lighteval/math": ("MATH", frozenset({"test"})),
    "huggingfaceh4/math-500": ("MATH-500", frozenset({"test"})),
    "allenai/ai2_arc": ("ARC", frozenset({"test"})),
    "rowan/hellaswag": ("HellaSwag", frozenset({"validation", "test"})),
    "hellaswag": ("HellaSwag", frozenset({"validation", "test"})),
    "truthfulqa/truthful_qa": ("TruthfulQA", frozenset({"validation"})),
    "truthful_qa": ("TruthfulQA", frozenset({"validation"})),
    "allenai/winogrande": ("WinoGrande", frozenset({"validation", "test"})),
    "winogrande": ("WinoGrande", frozenset({"validation", "test"})),
    "openai/openai_humaneval": ("HumanEval", frozenset({"test"})),
    "openai_humaneval": ("HumanEval", frozenset({"test"})),
    "google-research-datasets/mbpp": ("MBPP", frozenset({"test"})),
    "mbpp": ("MBPP", frozenset({"test"})),
    "idavidrein/gpqa": ("GPQA", frozenset({"train"})),  # GPQA ships its eval set as "train"
    "lukaemon/bbh": ("BIG-Bench Hard", frozenset({"test"})),
    "shunk031/jglue": ("JGLUE", frozenset({"validation"})),
    "sakanaai/ja-vg-vqa-500": ("JA-VG-VQA-500", frozenset({"test"})),
    "sakanaai/ja-vlm-bench-in-the-wild": ("JA-VLM-Bench-In-the-Wild", frozenset({"test"})),
}

# Datasets built from a benchmark's test split but known to be disjoint from the benchmark
# items that are reported. The paper (Akiba et al. 2025) selects on these 1069 Japanese GSM8K
# test items (250-1318), which do not overlap MGSM (GSM8K test items 0-249) used for reporting.
KNOWN_DISJOINT: dict[str, str] = {
    "sakanaai/gsm8k-ja-test_250-1319": "Japanese GSM8K test items 250-1318, disjoint from MGSM "
                                       "(GSM8K test items 0-249), as in Akiba et al. (2025)",
}

_LOCAL_NAME_HINTS: dict[str, str] = {"gsm8k": "GSM8K", "mgsm": "MGSM", "mmlu": "MMLU", "humaneval": "HumanEval",
                                     "hellaswag": "HellaSwag", "truthfulqa": "TruthfulQA", "winogrande": "WinoGrande"}


@dataclass(frozen=True)
class ContaminationFinding:
    """Selection data that is a known benchmark's evaluation split."""

    field: str  # the config field, e.g. "fitness.dataset"
    dataset: str
    split: str
    benchmark: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def sentence(self) -> str:
        return (f"{self.field} selects on {self.dataset} split {self.split!r}, the evaluation split of "
                f"{self.benchmark}")


def _split_names(split: str) -> set[str]:
    """``test[:100]+validation`` -> ``{"test", "validation"}``."""
    return {re.sub(r"\[.*$", "", part).strip().lower() for part in str(split).split("+") if part.strip()}


def _data_file_names(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _data_file_names(v)]
    return [str(f) for f in data_files]


def find_contamination(spec: Any, field: str = "fitness.dataset") -> ContaminationFinding | None:
    """The finding for one dataset spec (``path``, ``split``, ``data_files``), or ``None``."""
    if spec is None:
        return None
    path = str(spec.path).strip()
    key = path.lower().rstrip("/")
    if key in KNOWN_DISJOINT:
        return None
    split = str(getattr(spec, "split", "train") or "train")
    if key in KNOWN_BENCHMARKS:
        name, eval_splits = KNOWN_BENCHMARKS[key]
        files = _data_file_names(getattr(spec, "data_files", None))
        used = _split_names(split) | {s for f in files for s in eval_splits if s in f.lower().rsplit("/", 1)[-1]}
        hit = sorted(used & eval_splits)
        return ContaminationFinding(field, path, hit[0], name) if hit else None
    # A local file named after a benchmark's test split.
    for f in [path] + _data_file_names(getattr(spec, "data_files", None)):
        lowered = f.lower()
        if "test" in re.split(r"[^a-z0-9]+", lowered):
            for hint, bench in _LOCAL_NAME_HINTS.items():
                if hint in lowered:
                    return ContaminationFinding(field, f, "test", bench)
    return None


def selection_specs(fitness: Any) -> list[tuple[str, Any]]:
    """The dataset specs a run selects models on: ``fitness.dataset`` and, when the best model is
    chosen on it (``fitness.selection: validation``), ``fitness.validation``. ``fitness.test`` is
    reporting only."""
    specs = [("fitness.dataset", getattr(fitness, "dataset", None))]
    if getattr(fitness, "selection", "train") == "validation":
        specs.append(("fitness.validation", getattr(fitness, "validation", None)))
    return [(f, s) for f, s in specs if s is not None]


def check_fitness_contamination(fitness: Any) -> list[ContaminationFinding]:
    """Refuse (ConfigError) selection on a known benchmark's evaluation split unless
    ``fitness.allow_benchmark_test_split`` is true; returns the allowed findings (for the card)."""
    findings = [f for field, spec in selection_specs(fitness) if (f := find_contamination(spec, field))]
    if findings and not getattr(fitness, "allow_benchmark_test_split", False):
        first = findings[0]
        raise ConfigError(
            f"{first.sentence()}: selecting on it contaminates that benchmark's scores; select on a "
            f"training or disjoint split, or set fitness.allow_benchmark_test_split: true (the model "
            "card will say so)"
        )
    return findings


def check_run_contamination(config: Any) -> list[ContaminationFinding]:
    """:func:`check_fitness_contamination` of a run config's ``fitness``."""
    return check_fitness_contamination(config.fitness)


def describe_contamination(config: dict[str, Any]) -> list[dict[str, str]]:
    """Findings for a stored (JSON) run config, as dicts; never raises for allowed runs."""
    fitness = config.get("fitness") or {}

    def ns(spec: dict[str, Any] | None) -> Any:
        return None if not spec else SimpleNamespace(path=spec.get("path", ""), split=spec.get("split", "train"),
                                                     data_files=spec.get("data_files"))

    allowed = SimpleNamespace(dataset=ns(fitness.get("dataset")), validation=ns(fitness.get("validation")),
                              selection=fitness.get("selection", "train"), allow_benchmark_test_split=True)
    return [f.to_dict() for f in check_fitness_contamination(allowed)]
