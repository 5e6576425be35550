"""Vision-language models (VLMs): where the language model lives, and merging LLMs into it.

A VLM family entry (`VLM_FAMILIES`) says, for one architecture, under which tensor names the
language model (LM) sits, in every layout we accept when reading:

| family | layout | LM body | LM head | kept (vision + projector) |
|---|---|---|---|---|
| LLaVA, LLaVA-NeXT | checkpoint (what transformers 4 and 5.24 save) | `language_model.model.` | `language_model.lm_head.` | `vision_tower.*`, `multi_modal_projector.*` (NeXT: `image_newline`) |
| LLaVA, LLaVA-NeXT | in-memory (also accepted on disk) | `model.language_model.` | `lm_head.` | `model.vision_tower.*`, `model.multi_modal_projector.*` |

Every LM tensor maps to the *canonical* name an LLM of the same family uses
(`model.layers.N...`, `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`), so a
merge recipe runs on canonical names with the VLM's LM as one more model. Tensors that are not
the LM's (vision tower, projector, anything else) are never merged: they are copied bit for bit.
Adding a family (Qwen2-VL, Idefics, Gemma 3) is one `VLMFamily` entry plus a test.
"""  # noqa: E501 - the table's rows

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge_core.sources import architectures as arch
from evomerge_core.errors import MergeError, SourceError
from evomerge_core.sources.vlm_families import LMLayout, VLMFamily, detect_layout, family_of, require_family
from evomerge_core.io.model_dir import ModelDirWriter, check_target, set_config_dtype
from evomerge_core.io.model_files import AUX_FILES, LazyModelReader, PlannedTensor, read_config
from evomerge_core.config.schema import RunConfig
from evomerge_core.kinds.base import RUN_KINDS, publish_best
from evomerge_core.kinds.cache import cached_model
from evomerge_core.kinds.llm import recipe_files
from evomerge_core.kinds.resident import recipe_hash
from evomerge_core.io.dtypes import parse_dtype
from evomerge_core.merge.engine import check_shard_size, merge_tensor
from evomerge_core.sources.resolve import check_same_tensors, resolve_run_source
from evomerge_core.runs.store import RunStore
from evomerge_core.spaces import PSSpace

@dataclass(frozen=True)
class VLMCheckpoint:
    """A VLM directory's language-model map: canonical LLM name -> tensor name in its files."""

    path: Path
    family: VLMFamily
    layout: LMLayout
    config: dict[str, Any]
    lm_names: dict[str, str]  # canonical -> on-disk name
    other_names: list[str]  # vision tower, projector, ... (kept as they are)

    @property
    def text_config(self) -> dict[str, Any]:
        return self.family.text_config(self.config)


def open_vlm(path: Path | str, *, what: str = "the VLM") -> VLMCheckpoint:
    """Read a VLM directory's config and tensor names and map its language model."""
    path = Path(path)
    config = read_config(path)
    family = require_family(config, what=what)
    names = LazyModelReader(path).names()
    layout = detect_layout(family, names)
    lm: dict[str, str] = {}
    other: list[str] = []
    for name in names:
        canonical = layout.canonical(name)
        if canonical is None:
            other.append(name)
        else:
            lm[canonical] = name
    return VLMCheckpoint(path, family, layout, config, lm, other)


def read_lm_state_dict(checkpoint: VLMCheckpoint) -> dict[str, torch.Tensor]:
    """The VLM's language-model tensors under canonical LLM names."""
    reader = LazyModelReader(checkpoint.path)
    return {canonical: reader.get(name) for canonical, name in checkpoint.lm_names.items()}


# Config keys of the text model that must agree between the VLM's LM and an LLM.
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class VLMSourceInfo:
    """What a VLM merge needs: the VLM's map, layer count and the LM tensor shapes."""

    vlm: str
    checkpoint: VLMCheckpoint
    num_layers: int
    lm_shapes: dict[str, tuple[int, ...]]


def validate_vlm_sources(sources: Mapping[str, Path | str], *, vlm: str) -> VLMSourceInfo:
    """Check that every LLM in `sources` can be merged into the language model of the VLM
    `sources[vlm]`: same family (text model type), same sizes, same tensor names and shapes
    (vocabulary tensors may differ in rows). Raises SourceError naming the problem."""
    if vlm not in sources:
        raise SourceError(f"the VLM {vlm!r} is not among the resolved sources")
    ckpt = open_vlm(Path(sources[vlm]), what=f"model {vlm!r} (marked vlm: true)")
    text = ckpt.text_config
    text_type = text.get("model_type")
    lm_reader = LazyModelReader(ckpt.path)
    lm_shapes = {c: lm_reader.tensors[n].shape for c, n in ckpt.lm_names.items()}
    for ref, path in sources.items():
        if ref == vlm:
            continue
        config = read_config(Path(path))
        if family_of(config) is not None:
            raise SourceError(f"model {ref!r} is also a VLM; merge LLMs into one VLM (mark exactly one source vlm: true)")
        model_type = config.get("model_type")
        if model_type != text_type:
            raise SourceError(
                f"model {ref!r} is a {model_type} model but the language model of VLM {vlm!r} is a {text_type}; "
                "merge LLMs of the VLM's language-model family only"
            )
        for key in _SHAPE_KEYS:
            a, b = config.get(key), text.get(key)
            if a is not None and b is not None and a != b:
                raise SourceError(
                    f"model {ref!r} has {key} {a} but the language model of VLM {vlm!r} has {b}; "
                    "only LLMs of the same size can be merged into it"
                )
        other = LazyModelReader(Path(path)).tensors
        check_same_tensors(lm_shapes, other, ref=f"the language model of VLM {vlm!r}", model=ref)
        for name, shape in lm_shapes.items():
            got = other[name].shape
            if got == shape:
                continue
            vocab_only = arch.is_vocab_tensor(name) and len(got) == len(shape) and got[1:] == shape[1:]
            if not vocab_only:
                raise SourceError(
                    f"tensor {name} has shape {list(got)} in model {ref!r} but {list(shape)} in the language model of "
                    f"VLM {vlm!r}; the models cannot be merged"
                )
    try:
        layers = arch.num_hidden_layers(text)
    except ValueError as exc:
        raise SourceError(f"VLM {vlm!r}: {exc}") from None
    return VLMSourceInfo(vlm=vlm, checkpoint=ckpt, num_layers=layers, lm_shapes=lm_shapes)


def load_source_state_dicts(sources: Mapping[str, Path | str], *, vlm: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every source's LM tensors under canonical names (the VLM's LM extracted, LLMs as they are)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for ref, path in sources.items():
        if ref == vlm:
            out[ref] = read_lm_state_dict(open_vlm(Path(path)))
        else:
            reader = LazyModelReader(Path(path))
            out[ref] = {name: reader.get(name) for name in reader.names()}
    return out


def _merge(recipe: Any, name: str, tensors: Mapping[str, torch.Tensor], num_layers: int, vlm: str) -> torch.Tensor:
    # The VLM is the reference: its extra vocabulary rows (image tokens) are kept.
    return merge_tensor(recipe, name, tensors, num_layers=num_layers, reference=vlm)


def load_vlm_model(path: Path | str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a VLM directory with its family's transformers class (eval mode)."""
    import transformers  # deferred: transformers is heavy, loaded only when a VLM is

    family = require_family(read_config(Path(path)), what=str(path))
    cls = getattr(transformers, family.model_class)
    return cls.from_pretrained(str(path), dtype=dtype).to(device).eval()


def load_processor(path: Path | str) -> Any:
    """The VLM's processor (image processor + tokenizer + chat template), left padding."""
    from transformers import AutoProcessor  # deferred: transformers is heavy

    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    return processor


class ResidentVLM:
    """The VLM counterpart of `resident.ResidentModel`: the VLM stays loaded, each candidate
    recipe is merged into its language model in place; the vision tower and projector are
    never written. `tokenizer` is the processor's tokenizer, `processor` the full processor."""

    def __init__(self, sources: Mapping[str, str | Path], *, vlm: str, num_layers: int,
                 dtype: str = "float32", device: str = "cpu") -> None:
        self.sources = {ref: Path(p) for ref, p in sources.items()}
        self.vlm = vlm
        self.num_layers = num_layers
        self.lock = threading.RLock()
        self.state_dicts = load_source_state_dicts(self.sources, vlm=vlm)
        self.model = load_vlm_model(self.sources[vlm], dtype=parse_dtype(dtype), device=device)
        self.processor = load_processor(self.sources[vlm])
        self.tokenizer = self.processor.tokenizer
        family = require_family(read_config(self.sources[vlm]), what=vlm)
        model_sd = self.model.state_dict(keep_vars=True)
        self._targets: dict[str, torch.Tensor] = {}
        for canonical in self.state_dicts[vlm]:
            name = family.memory.vlm_name(canonical)
            if name not in model_sd:
                raise MergeError(f"language-model tensor {canonical} maps to {name}, which the loaded {family.name} model lacks; fix the VLM map")
            self._targets[canonical] = model_sd[name]
        self.current: str | None = None

    @torch.no_grad()
    def apply(self, recipe: Any) -> None:
        """Merge `recipe` into the VLM's language model in place (caller holds `lock`)."""
        self.current = None
        for name, target in self._targets.items():
            tensors = {ref: sd[name] for ref, sd in self.state_dicts.items()}
            merged = _merge(recipe, name, tensors, self.num_layers, self.vlm)
            if not bool(torch.isfinite(merged).all()):
                raise MergeError(f"the merge produced non-finite values in tensor {name}")
            if tuple(merged.shape) != tuple(target.shape):
                raise MergeError(f"merged tensor {name} has shape {list(merged.shape)}, the VLM expects {list(target.shape)}")
            target.data.copy_(merged.to(dtype=target.dtype, device=target.device))
        self.current = recipe_hash(recipe)


def get_resident_vlm(sources: Mapping[str, str | Path], *, vlm: str, num_layers: int,
                     dtype: str = "float32", device: str = "cpu") -> ResidentVLM:
    """The process-wide resident VLM for these sources (loaded on first use; one model per
    worker, `kinds.cache`)."""
    key = ("vlm", tuple(sorted((r, str(p)) for r, p in sources.items())), vlm, num_layers, dtype, device)
    return cached_model(key, lambda: ResidentVLM(sources, vlm=vlm, num_layers=num_layers, dtype=dtype, device=device))


def merge_vlm_to_dir(recipe: Any, sources: Mapping[str, Path | str], out_dir: Path | str, *, vlm: str,
                     dtype: str | None = None, overwrite: bool = False, shard_size: int = 5 * 10**9) -> Path:
    """Write the VLM with its language model replaced by the recipe's merge, atomically.

    Tensor names, order and layout are the VLM's own; non-LM tensors (vision tower, projector)
    are copied byte for byte in their own dtype; LM tensors are written in `dtype` (default:
    the recipe's, else the VLM's). Config, processor, tokenizer, chat template and generation
    config come from the VLM; `recipe.yaml` records the recipe.
    """
    out_dir = Path(out_dir)
    check_shard_size(shard_size)
    paths = {ref: Path(p) for ref, p in sources.items()}
    missing = [m for m in recipe.model_names() if m not in paths]
    if missing:
        raise MergeError(f"model {missing[0]!r} of the recipe was not resolved to a directory")
    check_target(out_dir, overwrite=overwrite, sources={m: paths[m] for m in set(recipe.model_names()) | {vlm}})
    info = validate_vlm_sources({m: paths[m] for m in set(recipe.model_names()) | {vlm}}, vlm=vlm)
    ckpt = info.checkpoint
    readers = {ref: LazyModelReader(paths[ref]) for ref in set(recipe.model_names()) | {vlm}}
    vlm_reader = readers[vlm]
    to_canonical = {name: c for c, name in ckpt.lm_names.items()}
    first_lm = vlm_reader.tensors[next(iter(ckpt.lm_names.values()))].dtype
    named = dtype or recipe.out_dtype or recipe.dtype
    lm_dtype = parse_dtype(named) if named else first_lm
    planned = [
        PlannedTensor(n, lm_dtype if n in to_canonical and info_.dtype.is_floating_point else info_.dtype, info_.shape)
        for n, info_ in vlm_reader.tensors.items()
    ]
    with ModelDirWriter(out_dir) as out:
        writer = out.shards(planned, shard_size)
        for item in planned:
            canonical = to_canonical.get(item.name)
            if canonical is None or not item.dtype.is_floating_point:
                writer.write(item.name, vlm_reader.get(item.name))  # kept bit for bit
                continue
            tensors = {ref: (r.get(ckpt.lm_names[canonical]) if ref == vlm else r.get(canonical)).to(torch.float32)
                       for ref, r in readers.items()}
            merged = _merge(recipe, canonical, tensors, info.num_layers, vlm)
            writer.write(item.name, merged.to(item.dtype))
        config = dict(ckpt.config)
        out.write_config(set_config_dtype(config, lm_dtype) if named else config)
        out.copy_files(paths[vlm], [f for f in AUX_FILES if f != "config.json"])
        out.write_recipe(yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False, allow_unicode=True))
        out.write_sources({m: paths[m] for m in recipe.model_names()})
        out.commit()
    return out_dir


# --------------------------------------------------------------------------- evolve runs


class VLMKind:
    """PS over a VLM's language model (`RunKind`): LLMs merged into the VLM's LM in place
    (`ResidentVLM`); the best is the whole VLM, processor kept."""

    name = "vlm"

    def resolve_sources(self, config: RunConfig) -> dict[str, Any]:
        paths = {s.model: resolve_run_source(s) for s in config.sources}
        info = validate_vlm_sources(paths, vlm=config.vlm)
        return {"paths": {k: str(v) for k, v in paths.items()}, "num_layers": info.num_layers,
                "architecture": arch.architecture_name(info.checkpoint.config)}

    def num_layers(self, config: RunConfig, paths: Mapping[str, str]) -> int:
        return arch.num_hidden_layers(open_vlm(paths[self._vlm(config)]).text_config)

    def build_space(self, config: RunConfig, paths: Mapping[str, str]) -> PSSpace:
        return PSSpace.from_config(config, num_layers=self.num_layers(config, paths))

    def open_model(self, config: RunConfig, paths: Mapping[str, str]) -> ResidentVLM:
        return get_resident_vlm(paths, vlm=self._vlm(config), num_layers=self.num_layers(config, paths),
                                dtype=config.runtime.dtype, device=config.runtime.device)

    def check_local(self, config: RunConfig) -> None:
        return None

    def check_resolved(self, config: RunConfig, paths: Mapping[str, str]) -> None:
        return None  # `validate_vlm_sources` (resolve_sources) checked the LM map

    def check_stage_source(self, path: Path, ref: str) -> None:
        return None

    def materialise_best(self, config: RunConfig, paths: Mapping[str, str], num_layers: int,
                         genome: Sequence[float], store: RunStore) -> str:
        """The VLM with its language model merged (`output.dtype`, else the evaluation dtype);
        `recipe.yaml` and `mergekit.yaml` beside it."""
        recipe = PSSpace.from_config(config, num_layers=num_layers).decode(genome)
        return publish_best(
            store,
            lambda out: merge_vlm_to_dir(recipe, {k: Path(v) for k, v in paths.items()}, out, vlm=self._vlm(config),
                                         dtype=config.output.dtype or config.runtime.dtype),
            lambda: recipe_files(recipe))

    @staticmethod
    def _vlm(config: RunConfig) -> str:
        assert config.vlm is not None  # `run_kind` picks this kind only for a VLM source
        return config.vlm


RUN_KINDS.add("vlm", VLMKind())
