"""Source models: resolve references to local snapshots and check they can be merged.

A reference is one of
- a local directory (`./models/a`, `/abs/path`, `file:///abs/path`);
- an fsspec URL (`s3://bucket/prefix/model`, `memory://...`): its weight and non-weight files
  are copied into a local cache;
- a Hugging Face Hub id `org/name` or `org/name@revision`: a `snapshot_download` of the
  safetensors, config, tokenizer/processor and generation-config files only.

Pickle (`.bin`) weights are refused unless `allow_pickle=True`; then they are converted once
to safetensors (`torch.load(weights_only=True)`, shard by shard) next to the snapshot.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import fsspec
import torch
from safetensors.torch import save_file

from evomerge_core.sources import architectures as arch
from evomerge_core.sources.vlm_families import family_of
from evomerge_core.errors import SourceError
from evomerge_core.io.model_files import AUX_FILES, LazyModelReader, read_config

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
AUX_PATTERNS = list(AUX_FILES) + ["*.tiktoken", "tokenizer*"]
PICKLE_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]


def default_cache_dir() -> Path:
    """Where remote sources are cached ($EVOMERGE_CACHE or ~/.cache/evomerge/sources)."""
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge" / "sources"))


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """Split `org/name@revision` into (repo_id, revision or None)."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, (revision or None)


PICKLE_HINT = "pass --allow-pickle to convert them to safetensors"
RUN_PICKLE_HINT = "set allow_pickle: true on this source in the run config to convert them to safetensors"


def resolve_run_source(spec) -> Path:
    """Resolve one source of a run config (`config.SourceSpec`), with its `allow_pickle`."""
    return resolve_source(spec.model, allow_pickle=spec.allow_pickle, pickle_hint=RUN_PICKLE_HINT)


def resolve_source(ref: str, *, allow_pickle: bool = False, cache_dir: Path | None = None, token: str | None = None,
                   pickle_hint: str = PICKLE_HINT) -> Path:
    """Resolve a model reference to a local directory with safetensors weights; `pickle_hint`
    is how the caller's user allows pickle weights (named when they are refused)."""
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    local = Path(ref).expanduser()
    if "://" in ref:
        path = _fetch_fsspec(ref, cache_dir or default_cache_dir(), allow_pickle)
    elif local.is_dir():
        path = local.resolve()
    elif ref.startswith((".", "/", "~")) or local.exists() or not HUB_ID_RE.match(ref):
        raise SourceError(f"model {ref!r} is not an existing directory, an fsspec URL or a Hub id (org/name[@revision]); check the path")
    else:
        path = _fetch_hub(ref, cache_dir, token, allow_pickle)
    return _ensure_safetensors(ref, path, allow_pickle, cache_dir or default_cache_dir(), pickle_hint)


def _fetch_hub(ref: str, cache_dir: Path | None, token: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download  # deferred: ~1 s import; only Hub sources need it

    repo_id, revision = parse_hub_ref(ref)
    patterns = WEIGHT_PATTERNS + AUX_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=str(cache_dir) if cache_dir else None,
                token=token,
            )
        )
    except Exception as exc:  # hub errors carry URLs, never the token
        raise SourceError(f"cannot download {ref} from the Hugging Face Hub ({type(exc).__name__}); "
                          "check the id, revision, token and network") from None


def _fetch_fsspec(url: str, cache_dir: Path, allow_pickle: bool) -> Path:
    target = cache_dir / ("fsspec-" + hashlib.sha256(url.encode()).hexdigest()[:16])
    try:
        fs, root = fsspec.core.url_to_fs(url)
        entries = fs.ls(root, detail=False)
    except Exception as exc:
        raise SourceError(f"cannot list {url} ({type(exc).__name__}: {exc}); check the URL and credentials") from None
    patterns = WEIGHT_PATTERNS + AUX_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in entries]
    wanted = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    if not wanted:
        raise SourceError(f"{url} holds no model files (config.json, *.safetensors); check the URL")
    tmp = target.with_name(target.name + f".part-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for name in wanted:
            fs.get(root.rstrip("/") + "/" + name, str(tmp / name))
    except Exception as exc:
        raise SourceError(f"cannot download {url} ({type(exc).__name__}: {exc}); check the URL and credentials") from None
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _ensure_safetensors(ref: str, path: Path, allow_pickle: bool, cache_dir: Path, pickle_hint: str = PICKLE_HINT) -> Path:
    if list(path.glob("*.safetensors")):
        return path
    pickles = sorted(path.glob("*.bin"))
    if not pickles:
        raise SourceError(f"model {ref!r} ({path}) has no safetensors weights; it cannot be merged")
    if not allow_pickle:
        raise SourceError(
            f"model {ref!r} only has pickle .bin weights, which can run code when loaded; {pickle_hint}"
        )
    return convert_pickle_dir(path, cache_dir / ("converted-" + hashlib.sha256(str(path).encode()).hexdigest()[:16]))


def convert_pickle_dir(src: Path, dst: Path) -> Path:
    """Convert a directory with `.bin` weights to safetensors (one shard at a time)."""
    if (dst / ".complete").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    bins = sorted(p for p in src.glob("*.bin") if p.name != "training_args.bin")
    for i, path in enumerate(bins):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise SourceError(f"cannot load pickle weights {path} safely ({exc}); convert them to safetensors yourself") from None
        name = "model.safetensors" if len(bins) == 1 else f"model-{i + 1:05d}-of-{len(bins):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        del state
    if len(bins) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for aux in AUX_FILES:
        if (src / aux).is_file():
            shutil.copy2(src / aux, dst / aux)
    (dst / ".complete").write_text("ok")
    return dst


def _refuse_vlm_mix(name: str, config: dict, reference: str, ref_config: dict) -> None:
    """SourceError pointing to the VLM route when exactly one of two models is a VLM."""
    vlm = [(ref, arch.architecture_name(cfg)) for ref, cfg in ((name, config), (reference, ref_config)) if family_of(cfg)]
    if len(vlm) != 1:
        return
    (vlm_ref, vlm_arch), llm_ref = vlm[0], (reference if vlm[0][0] == name else name)
    raise SourceError(
        f"model {vlm_ref!r} is a vision-language model ({vlm_arch}) and {llm_ref!r} a plain LLM; a plain merge "
        "cannot combine them. To merge LLMs into the VLM's language model, use `evomerge evolve` with that source "
        "marked `vlm: true`, or evomerge_core.kinds.vlm.merge_vlm_to_dir for a fixed recipe (docs/vlm.md)"
    )


@dataclass
class SourceInfo:
    """What the merge needs to know about a validated set of sources."""

    architecture: str
    num_layers: int
    reference: str  # the model whose config, tensor names and shapes the output takes
    tensor_shapes: dict[str, tuple[int, ...]]  # reference shapes, in file order
    tensor_dtypes: dict[str, object]  # reference dtypes (torch.dtype)
    vocab_sizes: dict[str, int | None] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)


def check_same_tensors(ref_tensors: Mapping[str, Any], other: Mapping[str, Any], *, ref: str, model: str) -> None:
    """SourceError naming the first tensor of `ref` that `model` lacks, or that it has in excess."""
    missing = [t for t in ref_tensors if t not in other]
    if missing:
        raise SourceError(f"tensor {missing[0]} of {ref} is missing from model {model!r}; the models do not have the same tensors")
    extra = [t for t in other if t not in ref_tensors]
    if extra:
        raise SourceError(f"model {model!r} has tensor {extra[0]} that {ref} lacks; the models do not have the same tensors")


def validate_sources(sources: Mapping[str, Path], *, base: str | None) -> SourceInfo:
    """Check that sources can be merged: same architecture, layer count, tensor names and
    shapes. Vocabulary tensors may differ in their first axis only (see docs/merging.md)."""
    if not sources:
        raise SourceError("no source models given")
    names = list(sources)
    if base is not None and base not in sources:
        raise SourceError(f"base model {base!r} is not among the resolved sources")
    reference = base if base is not None else names[0]
    configs = {name: read_config(Path(path)) for name, path in sources.items()}
    readers = {name: LazyModelReader(Path(path)) for name, path in sources.items()}
    try:
        ref_arch = arch.architecture_name(configs[reference])
        ref_layers = arch.num_hidden_layers(configs[reference])
    except ValueError as exc:
        raise SourceError(f"model {reference!r}: {exc}") from None
    ref_tensors = readers[reference].tensors
    for name in names:
        if name == reference:
            continue
        try:
            a = arch.architecture_name(configs[name])
            layers = arch.num_hidden_layers(configs[name])
        except ValueError as exc:
            raise SourceError(f"model {name!r}: {exc}") from None
        if a != ref_arch:
            _refuse_vlm_mix(name, configs[name], reference, configs[reference])
            raise SourceError(f"model {name!r} is a {a} but {reference!r} is a {ref_arch}; only models of one architecture can be merged")
        if layers != ref_layers:
            raise SourceError(f"model {name!r} has {layers} layers but {reference!r} has {ref_layers}; merged models need the same depth")
        other = readers[name].tensors
        check_same_tensors(ref_tensors, other, ref=repr(reference), model=name)
        for tname, info in ref_tensors.items():
            shape = other[tname].shape
            if shape == info.shape:
                continue
            vocab_only = arch.is_vocab_tensor(tname) and len(shape) == len(info.shape) and shape[1:] == info.shape[1:]
            if not vocab_only:
                raise SourceError(
                    f"tensor {tname} has shape {list(shape)} in model {name!r} but {list(info.shape)} in {reference!r}; the models cannot be merged"
                )
    return SourceInfo(
        architecture=ref_arch,
        num_layers=ref_layers,
        reference=reference,
        tensor_shapes={t: i.shape for t, i in ref_tensors.items()},
        tensor_dtypes={t: i.dtype for t, i in ref_tensors.items()},
        vocab_sizes={name: arch.vocab_size(cfg) for name, cfg in configs.items()},
        configs=configs,
    )
