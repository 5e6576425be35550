"""ROUGE-L scorers: `rouge_l` on generated text (any LLM) and `vqa_rouge_l` on a VLM's
answers to image + question items (the paper's VLM fitness, JA-VG-VQA-500).

- ROUGE-L is the LCS F-measure (beta 1) between the answer and the reference. Tokenisation
  (option ``tokenize``): ``chars`` (every non-space character, for scripts written without
  spaces such as Japanese), ``words`` (lower-cased runs of letters/digits) or ``auto`` (the
  default: ``chars`` when the reference holds Japanese/Chinese/Korean script, else ``words``).
  Both sides are NFKC-normalised first.
- With ``target_script`` set, an answer not written in that script scores 0 (the paper blanks
  non-Japanese answers); ``script_min_fraction`` as for `math_accuracy`.
- VQA items come from `datasets` with an image column (option ``image_column``, default
  ``image``): a `datasets.Image` feature (Hub dataset, imagefolder, parquet) or a path column
  (jsonl/csv), resolved relative to the data file's folder. Every image is opened and checked
  when the fitness is loaded, so a missing or unreadable image fails the run before any model
  work. The reference is the ``answer`` column, or option ``answer_template`` (a format string
  over the row, e.g. ``"{qas[0][answer]}"`` for JA-VG-VQA-500's list of QAs).
- The question goes through the VLM processor's chat template as one user turn (image, then
  text); with ``chat_template: false`` the rendered prompt is used as is and must contain the
  processor's image token.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge_core.errors import ConfigError
from evomerge_core.fitness.registry import ScoreContext
from evomerge_core.fitness.scorers import check_script_options
from evomerge_core.fitness.text import in_script
from evomerge_core.generation.hf_loop import truncate_at_stop

TOKENIZATIONS = ("auto", "chars", "words")
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def _cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF
            or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF or 0xFF66 <= code <= 0xFF9D)


def tokens(text: str, how: str = "auto", *, like: str | None = None) -> list[str]:
    """ROUGE tokens of `text`: characters or words (``auto`` looks at `like`, else `text`)."""
    if how not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenisation {how!r}; choose from {', '.join(TOKENIZATIONS)}")
    text = unicodedata.normalize("NFKC", str(text))
    if how == "auto":
        how = "chars" if any(_cjk(c) for c in (like if like is not None else text)) else "words"
    if how == "chars":
        return [c for c in text if not c.isspace()]
    return [w.casefold() for w in _WORD_RE.findall(text)]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, *, tokenize: str = "auto") -> float:
    """ROUGE-L F-measure in [0, 1] (tokenisation chosen from the reference for ``auto``)."""
    ref = tokens(reference, tokenize, like=str(reference))
    pred = tokens(prediction, tokenize, like=str(reference))
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def item_score(output: str, reference: Any, options: Mapping[str, Any]) -> float:
    """ROUGE-L of one answer; 0 when a target script is set and the answer is not in it."""
    script = options.get("target_script")
    if script is not None and not in_script(output, script, float(options.get("script_min_fraction", 0.5))):
        return 0.0
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    return max((rouge_l(output, str(r), tokenize=str(options.get("tokenize", "auto"))) for r in refs), default=0.0)


def _check(options: Mapping[str, Any], allowed: set[str], scorer: str) -> None:
    check_script_options(options, allowed, scorer)
    if options.get("tokenize", "auto") not in TOKENIZATIONS:
        raise ConfigError(f"fitness.options.tokenize: use one of {', '.join(TOKENIZATIONS)}, got {options.get('tokenize')!r}")


_TEXT_OPTIONS = {"target_script", "script_min_fraction", "tokenize"}
_VQA_OPTIONS = _TEXT_OPTIONS | {"image_column", "chat_template", "answer_template"}


def _summary(outputs: Sequence[str], answers: Sequence[Any], options: Mapping[str, Any]) -> dict[str, float]:
    scores = [item_score(o, a, options) for o, a in zip(outputs, answers)]
    exact = [s == 1.0 for s in scores]
    n = len(scores) or 1
    return {"fitness": sum(scores) / n, "accuracy": sum(exact) / n}


def rouge_l_score(ctx: ScoreContext) -> dict[str, float]:
    """Mean ROUGE-L of the generated texts (text-only models); accuracy = share of answers
    scoring 1. Options: ``tokenize``, ``target_script``, ``script_min_fraction``."""
    return _summary([o.strip() for o in ctx.outputs], ctx.answers, ctx.options)


rouge_l_score.worst_fitness = 0.0  # type: ignore[attr-defined]
rouge_l_score.check_options = lambda o: _check(o, _TEXT_OPTIONS, "rouge_l")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- VQA items


def _data_dir(spec: Any) -> Path | None:
    path = Path(str(spec.path)).expanduser()
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    files = spec.data_files
    first = files if isinstance(files, str) else (files[0] if isinstance(files, list) and files else None)
    if isinstance(files, dict):
        values = next(iter(files.values()), None)
        first = values if isinstance(values, str) else (values[0] if values else None)
    return Path(first).expanduser().parent if first else None


def _open_image(value: Any, base: Path | None, where: str, index: int) -> Any:
    from PIL import Image  # deferred: Pillow, optional: only VQA scoring opens images

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping):  # an undecoded datasets.Image value
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: row {index} has no image (got {value!r}); every VQA item needs one")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ConfigError(f"{where}: image {value!r} of row {index} does not exist ({path}); add the file or fix the path column")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for broken files
        raise ConfigError(f"{where}: image {value!r} of row {index} cannot be read ({type(exc).__name__}); replace the file") from None


def prepare_vqa_rows(rows: list[dict[str, Any]], spec: Any, where: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Open every row's image (RGB PIL image under ``image``); ConfigError naming the row for
    a missing column, file or unreadable image."""
    column = str(options.get("image_column", "image"))
    if rows and column not in rows[0]:
        raise ConfigError(f"{where}: dataset has no image column {column!r} (columns: {sorted(rows[0])}); set fitness.options.image_column")
    template = options.get("answer_template")
    base = _data_dir(spec)
    out = []
    for i, row in enumerate(rows):
        item = {**row, "image": _open_image(row.get(column), base, where, i)}
        if template is not None:
            try:
                item["answer"] = str(template).format(**row)
            except (KeyError, IndexError, TypeError) as exc:
                raise ConfigError(f"{where}: fitness.options.answer_template {template!r} does not fit row {i} "
                                  f"({type(exc).__name__}: {exc})") from None
        out.append(item)
    return out


def _vqa_required(options: Mapping[str, Any]) -> tuple[str, ...]:
    # With answer_template the reference comes from other columns (e.g. JA-VG-VQA's qas list).
    return () if options.get("answer_template") is not None else ("answer",)


# --------------------------------------------------------------------------- VQA generation


def vqa_prompts(processor: Any, prompts: Sequence[str], *, chat_template: bool = True) -> list[str]:
    """The text given to the processor for each question (chat template with one image)."""
    if not chat_template:
        token = getattr(processor, "image_token", None)
        if token and any(token not in p for p in prompts):
            raise ConfigError(f"fitness.prompt_template must contain the image token {token!r} when fitness.options.chat_template is false")
        return list(prompts)
    if not getattr(processor, "chat_template", None):
        raise ConfigError("the VLM's processor has no chat template; set fitness.options.chat_template: false and put "
                          "the image token in fitness.prompt_template")
    out = []
    for prompt in prompts:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        out.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def vqa_generate(model: Any, processor: Any, images: Sequence[Any], texts: Sequence[str], *,
                 max_new_tokens: int | Sequence[int], stop_strings: Sequence[str] = (), batch_size: int = 8) -> list[str]:
    """Greedy answers of a VLM to (image, text) pairs, cut at stop strings and stripped.
    `max_new_tokens` is one cap, or one per pair (`fitness.budget.length_caps`): a batch then
    generates up to its largest cap and each row keeps its own cap's tokens."""
    caps = [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(texts):
        raise ValueError(f"max_new_tokens has {len(caps)} caps for {len(texts)} prompts; give one per prompt")
    tok = processor.tokenizer
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch_text = list(texts[start:start + batch_size])
        batch_img = list(images[start:start + batch_size])
        batch_caps = caps[start:start + batch_size]
        inputs = processor(images=batch_img, text=batch_text, return_tensors="pt", padding=True)
        inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) if hasattr(v, "to") else v
                  for k, v in inputs.items()}
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=max(batch_caps), do_sample=False, pad_token_id=pad)
        new = generated[:, inputs["input_ids"].shape[1]:]
        for row, cap in zip(new, batch_caps, strict=True):
            text = tok.decode(row[:cap], skip_special_tokens=True)
            outputs.append(truncate_at_stop(text, stop_strings).strip())
    return outputs


def vqa_outputs(ctx: ScoreContext) -> list[str]:
    """The VLM's answers to the context's items (computed once per candidate)."""
    if "vqa_outputs" not in ctx.cache:
        if ctx.processor is None:
            raise ValueError("the vqa_rouge_l scorer needs a VLM and its processor; mark the VLM source with vlm: true")
        column_images = [row["image"] for row in ctx.rows]
        texts = vqa_prompts(ctx.processor, ctx.prompts, chat_template=bool(ctx.options.get("chat_template", True)))
        ctx.cache["vqa_outputs"] = vqa_generate(ctx.model, ctx.processor, column_images, texts,
                                                max_new_tokens=ctx.max_new_tokens, stop_strings=ctx.stop_strings,
                                                batch_size=ctx.batch_size)
    return ctx.cache["vqa_outputs"]


def vqa_rouge_l(ctx: ScoreContext) -> dict[str, float]:
    """Mean ROUGE-L of a VLM's answers to image + question items (wrong script: 0);
    accuracy = share of answers scoring 1. Options: ``tokenize``, ``target_script``,
    ``script_min_fraction``, ``image_column``, ``chat_template``."""
    return _summary(vqa_outputs(ctx), ctx.answers, ctx.options)


vqa_rouge_l.worst_fitness = 0.0  # type: ignore[attr-defined]
vqa_rouge_l.needs_images = True  # type: ignore[attr-defined]
vqa_rouge_l.check_options = lambda o: _check(o, _VQA_OPTIONS, "vqa_rouge_l")  # type: ignore[attr-defined]
vqa_rouge_l.prepare_rows = prepare_vqa_rows  # type: ignore[attr-defined]
vqa_rouge_l.required_columns = _vqa_required  # type: ignore[attr-defined]
