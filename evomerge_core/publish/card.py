"""The model card of a merged model (README.md on the Hub).

Metadata (huggingface_hub ``ModelCardData``): ``base_model`` (the Hub sources) with
``base_model_relation: merge`` and a ``base_model_revisions`` map (the commit each source was
merged at), ``license`` (see :mod:`evomerge_core.publish.licenses`), ``library_name: transformers``,
``pipeline_tag`` (``text-generation``, or ``image-text-to-text`` for a vision-language model),
tags (``merge``, ``evolutionary-model-merge``, the search spaces and the merge method) and, from
the run's held-out split only, ``model-index`` eval results. The selection fitness is reported in
the text, labelled as such, and never as an eval result.

The text comes from ``templates/model_card.md.j2``; every section is filled from the model
directory, the recipe and (when given) the evolve run's ``result.json`` and frozen config, and a
section without data is left out or says plainly that the data does not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge_core.errors import EvomergeError
from evomerge_core.publish.licenses import LicenseDecision, SourceLicense
from evomerge_core.fitness.contamination import KNOWN_DISJOINT
from evomerge_core.runs.records import best_label

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.j2"
TEXT_GENERATION = "text-generation"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
BASE_TAGS = ("merge", "evolutionary-model-merge", "evomerge")
MAX_GENERATION_ROWS = 20
_SPACE_LABELS = {"ps": "parameter space (PS)", "dfs": "data-flow space (DFS)", "vlm": "parameter space of the language model (VLM)"}


class CardError(EvomergeError):
    """The model card cannot be built or does not validate."""


def is_vision_language(config: dict[str, Any]) -> bool:
    """A VLM config: a ``vision_config``, or an architecture like ``LlavaForConditionalGeneration``
    that pairs a vision tower with a language model."""
    archs = [str(a) for a in config.get("architectures") or []]
    if "vision_config" in config:
        return True
    vlm_names = ("Llava", "Vision", "VL", "Idefics", "Paligemma", "Qwen2VL", "Mllama", "Pixtral", "Gemma3")
    return any(a.endswith("ForConditionalGeneration") and any(v.lower() in a.lower() for v in vlm_names) for a in archs)


def pipeline_tag_for(config: dict[str, Any]) -> str:
    """``image-text-to-text`` for a vision-language model, else ``text-generation``."""
    return IMAGE_TEXT_TO_TEXT if is_vision_language(config) else TEXT_GENERATION


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    return str(value)


@dataclass
class CardInputs:
    """Everything the card is built from. ``result``/``run_config`` come from an evolve run."""

    repo_id: str
    model_config: dict[str, Any]
    recipe: dict[str, Any]
    licenses: list[SourceLicense]
    license: LicenseDecision
    base: str | None = None  # the recipe's base model reference
    mergekit_yaml: str | None = None
    result: dict[str, Any] | None = None
    run_config: dict[str, Any] | None = None
    fitness_plot: bool = False
    contamination: list[dict[str, str]] = field(default_factory=list)
    evolved: bool = True  # found by an evolutionary search (False for a hand-written `evomerge merge`)


def _source_rows(inputs: CardInputs) -> list[dict[str, str]]:
    rows = []
    for found in inputs.licenses:
        s = found.source
        name = s.display
        link = f"[{name}](https://huggingface.co/{s.repo_id})" if s.repo_id else f"`{name}` (local directory)"
        rows.append({
            "name": name,
            "link": link,
            "role": "base" if inputs.base is not None and s.ref == inputs.base else "merged",
            "revision": f"`{s.revision}`" if s.revision else "not recorded",
            "license": found.label,
            "license_origin": found.origin,
        })
    return rows


def _space_kinds(result: dict[str, Any] | None, run_config: dict[str, Any] | None) -> list[str]:
    kind = ((result or {}).get("space") or {}).get("kind")
    if kind:
        return [k.strip() for k in str(kind).replace("_", "+").split("+") if k.strip()]
    return ["ps"] if run_config else []


def _run_facts(inputs: CardInputs) -> dict[str, Any] | None:
    result, config = inputs.result, inputs.run_config
    if result is None or config is None:
        return None
    space = result.get("space") or {}
    fitness = config.get("fitness") or {}
    dataset = fitness.get("dataset") or {}
    optimizer = config.get("optimizer") or {}
    gens = result.get("generations") or []
    kinds = _space_kinds(result, config)
    ps = (config.get("space") or {}).get("ps") or {}
    settings = [
        ("search space", " + ".join(_SPACE_LABELS.get(k, k) for k in kinds)),
        ("merge method", space.get("method") or ps.get("method")),
        ("evolved parameters", f"{len(space.get('names') or [])} ({_fmt(space.get('params') or ps.get('params'))})"),
        ("granularity", _fmt(ps.get("granularity")) if ps else None),
        ("fixed merge parameters", _fmt(ps.get("fixed") or {}) if ps else None),
        ("optimizer", f"CMA-ES, sigma0 {_fmt(optimizer.get('sigma0'))}, population "
                      f"{_fmt(optimizer.get('popsize') or 'default (4 + floor(3 ln n))')}, seed {_fmt(optimizer.get('seed'))}"),
        ("evaluations", f"{result.get('evaluations')} in {len(gens)} generations"),
        ("selection data", f"`{_dataset_label(dataset)}`"),
        ("scorer", f"`{fitness.get('scorer')}` {_fmt(fitness.get('options') or {})}".strip()),
        ("prompt template", f"`{fitness.get('prompt_template')!r}`" if fitness.get("prompt_template") else None),
        ("max new tokens", fitness.get("max_new_tokens")),
        ("best candidate", best_label(result.get("best_generation") or 0, result.get("best_index"))),
        ("config hash", f"`{result.get('config_hash')}`" if result.get("config_hash") else None),
    ]
    rows = gens
    elided = 0
    if len(gens) > MAX_GENERATION_ROWS:  # keep the first, the last and evenly spaced ones
        step = (len(gens) - 1) / (MAX_GENERATION_ROWS - 1)
        rows = [gens[round(i * step)] for i in range(MAX_GENERATION_ROWS)]
        elided = len(gens) - len(rows)
    train_items = result.get("train_items") or dataset.get("num_items")
    return {
        "method": space.get("method") or ps.get("method"),
        "space_label": " + ".join(_SPACE_LABELS.get(k, k) for k in kinds),
        "dataset": _dataset_label(dataset),
        "scorer": fitness.get("scorer"),
        "settings": [(k, _fmt(v) if not isinstance(v, str) else v) for k, v in settings if v is not None],
        "best_values": [(k, _fmt(float(v))) for k, v in (result.get("best_values") or {}).items()],
        "generations": [{"generation": g["generation"] + 1, "best": _fmt(g.get("best_fitness")),
                         "mean": _fmt(g.get("mean_fitness")), "failed": g.get("failed", 0)} for g in rows],
        "generations_elided": elided,
        "total_generations": len(gens),
        "best_fitness": _fmt(result.get("best_fitness")),
        "best_accuracy": _fmt(result.get("best_accuracy")),
        "train_items": _fmt(train_items),
    }


def public_names(sources: list[Any]) -> dict[str, str]:
    """`{ref: name}` for the sources whose reference is a local path (`SourceModel`s): the card
    and the pushed recipe name them by directory name (or Hub id, for a Hub cache snapshot),
    so no local path leaves the machine. Hub ids (`org/name[@rev]`) stay as they are."""
    return {s.ref: s.display for s in sources if s.repo_id is None or s.ref.partition("@")[0] != s.repo_id}


def scrub_refs(value: Any, names: dict[str, str]) -> Any:
    """`value` (a recipe mapping, list or string) with every string equal to a key of `names`
    replaced by its public name."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {k: scrub_refs(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_refs(v, names) for v in value]
    return value


def scrub_yaml_text(text: str | None, names: dict[str, str]) -> str | None:
    """A YAML document (a mergekit config) with local source paths replaced by public names."""
    if not text or not names:
        return text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        return yaml.safe_dump(scrub_refs(data, names), sort_keys=False, allow_unicode=True)
    for ref in sorted(names, key=len, reverse=True):
        text = text.replace(ref, names[ref])
    return text


def _public_path(path: str) -> str:
    """A dataset path as the card shows it: a local path by its last component."""
    local = path[len("file://"):] if path.startswith("file://") else path
    if "://" not in local and (local.startswith(("/", "~", "./", "../")) or Path(local).expanduser().exists()):
        return Path(local.rstrip("/")).name or local
    return path


def _dataset_label(spec: dict[str, Any]) -> str:
    if not spec:
        return "n/a"
    label = _public_path(str(spec.get("path")))
    if spec.get("name"):
        label += f" ({spec['name']})"
    return f"{label}, split {spec.get('split', 'train')}"


def _heldout(inputs: CardInputs, pipeline_tag: str) -> tuple[list[dict[str, str]], list[Any]]:
    """Rows of the held-out table and the matching huggingface_hub EvalResults."""
    from huggingface_hub import EvalResult  # deferred: ~1 s import; only publishing needs it

    test = (inputs.result or {}).get("test")
    spec = ((inputs.run_config or {}).get("fitness") or {}).get("test")
    if not test or not spec or test.get("error"):
        return [], []
    scorer = (inputs.run_config or {}).get("fitness", {}).get("scorer", "fitness")
    metrics: list[tuple[str, str, float]] = []
    if test.get("accuracy") is not None:
        metrics.append(("accuracy", "accuracy (held out)", float(test["accuracy"])))
    fit = test.get("fitness")
    if fit is not None and math.isfinite(fit) and (test.get("accuracy") is None or fit != test.get("accuracy")):
        metrics.append((str(scorer), f"{scorer} (held out)", float(fit)))
    rows, results = [], []
    for metric_type, metric_name, value in metrics:
        rows.append({"dataset": _public_path(str(spec.get("path"))), "split": spec.get("split", "test"), "metric": metric_name,
                     "value": _fmt(value), "count": _fmt(test.get("n_items"))})
        results.append(EvalResult(
            task_type=pipeline_tag, dataset_type=_public_path(str(spec.get("path"))),
            dataset_name=_public_path(str(spec.get("path"))),
            dataset_config=spec.get("name"), dataset_split=spec.get("split", "test"),
            dataset_revision=spec.get("revision"), metric_type=metric_type, metric_name=metric_name,
            metric_value=round(value, 6)))
    return rows, results


def _usage(repo_id: str, vlm: bool) -> str:
    if vlm:
        return (
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}")\n'
            f'processor = AutoProcessor.from_pretrained("{repo_id}")'
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        'inputs = tokenizer("Hello", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))"
    )


def _tags(inputs: CardInputs) -> list[str]:
    tags = [t for t in BASE_TAGS if t != "evolutionary-model-merge" or inputs.evolved]
    for kind in _space_kinds(inputs.result, inputs.run_config):
        tags.append(f"evomerge-{kind}")
    method = inputs.recipe.get("merge_method")
    if method:
        tags.append(str(method).replace("_", "-"))
    if inputs.mergekit_yaml:
        tags.append("mergekit")
    if is_vision_language(inputs.model_config):
        tags.append("vision-language")
    return list(dict.fromkeys(tags))


def build_model_card(inputs: CardInputs):
    """Render the card (a huggingface_hub ``ModelCard``) and check that its metadata parses."""
    from huggingface_hub import ModelCard, ModelCardData  # deferred: ~1 s import; only publishing needs it

    tag = pipeline_tag_for(inputs.model_config)
    vlm = tag == IMAGE_TEXT_TO_TEXT
    hub_sources = [f.source for f in inputs.licenses if f.source.repo_id]
    base_models = list(dict.fromkeys(s.repo_id for s in hub_sources))
    revisions = {s.repo_id: s.revision for s in hub_sources if s.revision}
    heldout_rows, eval_results = _heldout(inputs, tag)
    model_name = inputs.repo_id.split("/")[-1]
    extra: dict[str, Any] = {}
    if base_models:
        extra["base_model_relation"] = "merge"
        if revisions:
            extra["base_model_revisions"] = revisions
    data = ModelCardData(
        base_model=base_models or None,
        library_name="transformers",
        pipeline_tag=tag,
        license=inputs.license.license,
        license_name=inputs.license.license_name,
        license_link=inputs.license.license_link,
        tags=_tags(inputs),
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )
    disjoint = []
    if inputs.run_config:
        path = str(((inputs.run_config.get("fitness") or {}).get("dataset") or {}).get("path", ""))
        if path.lower() in KNOWN_DISJOINT:
            disjoint.append({"dataset": path, "note": KNOWN_DISJOINT[path.lower()]})
    archs = inputs.model_config.get("architectures") or ["unknown architecture"]
    is_run = inputs.result is not None and inputs.run_config is not None
    recipe_intro = ("The best recipe the search found, as `recipe.yaml` (evomerge's format, mergekit's schema plus "
                    "the DARE seed):" if is_run else "The recipe this model was built from (`recipe.yaml`):")
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        sources=_source_rows(inputs),
        kind_label="vision-language model" if vlm else "causal language model",
        architecture=archs[0],
        recipe_intro=recipe_intro,
        recipe_yaml=yaml.safe_dump(inputs.recipe, sort_keys=False, allow_unicode=True).rstrip(),
        mergekit_yaml=(inputs.mergekit_yaml or "").rstrip() or None,
        run=_run_facts(inputs),
        fitness_plot=inputs.fitness_plot,
        heldout=heldout_rows,
        contamination=[{**c, "dataset": _public_path(str(c.get("dataset", "")))} for c in inputs.contamination],
        disjoint=disjoint,
        usage=_usage(inputs.repo_id, vlm),
        license={"label": _license_label(inputs.license), "how": inputs.license.how},
    )
    validate_card_text(str(card))
    return card


def _license_label(decision: LicenseDecision) -> str:
    if decision.license == "other" and decision.license_name:
        return f"other ({decision.license_name})"
    return decision.license


def validate_card_text(text: str):
    """Parse a card with huggingface_hub's strict metadata parsing (``model-index`` included) and
    check the keys a merge card needs; returns the parsed ``ModelCard`` or raises CardError."""
    from huggingface_hub import ModelCard  # deferred: ~1 s import; only publishing needs it

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:
        raise CardError(f"the model card's metadata does not parse ({exc}); this is a bug in evomerge's card template") from None
    meta = card.data.to_dict()
    for key in ("license", "library_name", "pipeline_tag", "tags"):
        if not meta.get(key):
            raise CardError(f"the model card has no {key!r} metadata; this is a bug in evomerge's card builder")
    return card
