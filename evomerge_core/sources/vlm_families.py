"""VLM families: for each vision-language architecture, under which tensor names its language
model (LM) sits, in every layout we accept when reading (see `evomerge_core.kinds.vlm` for the
table and the merge). Adding a family is one `VLM_FAMILIES.add(...)` entry plus a test."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge_core.errors import MergeError, SourceError
from evomerge_core.registry import Registry
from evomerge_core.sources import architectures as arch

LLM_BODY = "model."
LLM_HEAD = "lm_head."


@dataclass(frozen=True)
class LMLayout:
    """Where a VLM's language model sits under one naming layout."""

    name: str
    body: str  # prefix of the decoder body (embeddings, layers, final norm)
    head: str  # prefix of the output head (`{head}weight`)

    def canonical(self, tensor_name: str) -> str | None:
        """The LLM name of a VLM tensor under this layout, or None when it is not the LM's."""
        if tensor_name.startswith(self.head):
            return LLM_HEAD + tensor_name[len(self.head):]
        if tensor_name.startswith(self.body):
            return LLM_BODY + tensor_name[len(self.body):]
        return None

    def vlm_name(self, canonical: str) -> str:
        """The VLM tensor name of a canonical LLM name under this layout."""
        if canonical.startswith(LLM_HEAD):
            return self.head + canonical[len(LLM_HEAD):]
        if canonical.startswith(LLM_BODY):
            return self.body + canonical[len(LLM_BODY):]
        raise MergeError(f"tensor {canonical} is not a language-model tensor (model.* or lm_head.*)")


@dataclass(frozen=True)
class VLMFamily:
    """One VLM architecture family: its layouts and the config key of its text model."""

    name: str
    architectures: tuple[str, ...]
    memory: LMLayout  # names of the loaded model (`model.state_dict()`)
    layouts: tuple[LMLayout, ...]  # accepted on disk
    kept_prefixes: tuple[str, ...]  # what stays the VLM's (documentation and tests)
    text_config_key: str = "text_config"
    model_class: str = ""  # transformers class name used to load it

    def text_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The language model's config dict inside the VLM config."""
        text = config.get(self.text_config_key)
        if not isinstance(text, dict):
            raise SourceError(f"the {self.name} config has no {self.text_config_key!r} section; is it a saved {self.name} model?")
        return text


_LLAVA_DISK = LMLayout("checkpoint", body="language_model.model.", head="language_model.lm_head.")
_LLAVA_MEMORY = LMLayout("in-memory", body="model.language_model.", head="lm_head.")

VLM_FAMILIES: Registry[VLMFamily] = Registry("VLM family", error=SourceError)
VLM_FAMILIES.add(
    "llava",
    VLMFamily(
        name="llava",
        architectures=("LlavaForConditionalGeneration",),
        memory=_LLAVA_MEMORY,
        layouts=(_LLAVA_DISK, _LLAVA_MEMORY),
        kept_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
        model_class="LlavaForConditionalGeneration",
    ),
)
VLM_FAMILIES.add(
    "llava_next",
    VLMFamily(
        name="llava_next",
        architectures=("LlavaNextForConditionalGeneration",),
        memory=_LLAVA_MEMORY,
        layouts=(_LLAVA_DISK, _LLAVA_MEMORY),
        kept_prefixes=("vision_tower.", "multi_modal_projector.", "image_newline", "model.vision_tower.",
                       "model.multi_modal_projector.", "model.image_newline"),
        model_class="LlavaNextForConditionalGeneration",
    ),
)


def supported_architectures() -> list[str]:
    """Every VLM architecture name in the map."""
    return [a for fam in VLM_FAMILIES.values() for a in fam.architectures]


def family_of(config: Mapping[str, Any]) -> VLMFamily | None:
    """The VLM family of a config.json dict, or None when it is not a VLM we know."""
    try:
        name = arch.architecture_name(dict(config))
    except ValueError:
        return None
    for fam in VLM_FAMILIES.values():
        if name in fam.architectures:
            return fam
    return None


def require_family(config: Mapping[str, Any], *, what: str) -> VLMFamily:
    """The VLM family of `config`; SourceError listing the supported ones when unknown."""
    fam = family_of(config)
    if fam is None:
        try:
            name = arch.architecture_name(dict(config))
        except ValueError:
            name = "model without an architecture name"
        raise SourceError(
            f"{what} is a {name}, which is not a supported VLM; supported: {', '.join(supported_architectures())} "
            "(add an entry to evomerge_core.sources.vlm_families.VLM_FAMILIES for another family)"
        )
    return fam


def detect_layout(family: VLMFamily, names: list[str]) -> LMLayout:
    """The layout a VLM checkpoint's tensor names use (the most specific body prefix that
    holds decoder layers); SourceError when none matches."""
    for layout in sorted(family.layouts, key=lambda lay: -len(lay.body)):
        if any(n.startswith(layout.body + "layers.") for n in names):
            return layout
    known = ", ".join(f"{lay.body}layers.N" for lay in family.layouts)
    raise SourceError(f"no language-model layers found in this {family.name} checkpoint (looked for {known}); is it a saved {family.name} model?")
