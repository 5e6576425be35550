"""Publish a merged model directory to the Hugging Face Hub (Prefect-free; the publish flow and
``evomerge publish`` call these).

    check repo id, model dir       (one clear error each, before anything is written)
    read the run (optional)        result.json, frozen config, report/fitness.png
    decide the license             from the sources (evomerge_core.publish.licenses)
    stage the folder               weights (resharded to <= shard size), config, tokenizer/processor,
                                   generation config, recipe.yaml, mergekit.yaml, evomerge_config.yaml,
                                   fitness.png, README.md (the model card)
    push                           create_repo(exist_ok) + upload_folder, or --dry-run: keep the folder
    record                         published.json in the run store (repo, revision, commit, digest)

The staged folder is a new directory: the model directory is never modified, so a failed upload
can simply be retried. The token is resolved at push time (argument, ``HF_TOKEN``, or the
huggingface_hub login), is only ever handed to ``HfApi``, and is redacted from every message.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge_core.errors import EvomergeError, SourceError, StorageError, UsageError
from evomerge_core.fitness.contamination import describe_contamination
from evomerge_core.io.model_dir import RECIPE_FILE, ModelDirWriter, find_recipe
from evomerge_core.io.model_files import AUX_FILES, SAFETENSORS_INDEX, LazyModelReader, PlannedTensor, read_config, weight_files
from evomerge_core.io.provenance import SOURCES_FILE, read_source_record
from evomerge_core.merge.mergekit_yaml import to_mergekit_yaml
from evomerge_core.merge.recipe import MergeRecipe
from evomerge_core.publish.card import (CardInputs, build_model_card, is_vision_language, public_names, scrub_refs,
                                        scrub_yaml_text)
from evomerge_core.publish.licenses import describe_source, find_license, merge_licenses
from evomerge_core.runs.store import RunStore

DEFAULT_SHARD_SIZE = 5 * 10**9
PUBLISHED = "published.json"
RECIPE = RECIPE_FILE  # THE recipe (io.model_dir); older names are read too (find_recipe)
MERGEKIT = "mergekit.yaml"
LINEAGE = "lineage.yaml"
RUN_CONFIG = "evomerge_config.yaml"
FITNESS_PLOT = "fitness.png"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")


class PublishError(EvomergeError):
    """The Hub refused or could not be reached; the local model is untouched (exit code 1)."""


# ------------------------------------------------------------------------------ checks


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` with Hub-valid names; UsageError otherwise."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith((".git", ".")) or repo_id.split("/")[1].startswith("."):
        raise UsageError(
            f"repo id {repo_id!r} is malformed; use ORG/NAME (letters, digits, '-', '_', '.'; no '--' or '..', "
            "at most 96 characters each), e.g. my-org/EvoLLM-7B")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The Hub token: ``token``, else ``HF_TOKEN``, else the huggingface_hub login; PublishError
    when there is none. The value is never printed."""
    if token:
        return token
    from huggingface_hub import get_token  # deferred: ~1 s import; only Hub uploads need it

    found = os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise PublishError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or (in a Prefect "
                           "deployment) name a Secret block with --token-secret-block")
    return found


def check_model_dir(model_dir: Path) -> dict[str, Any]:
    """Check a model directory is complete (config.json, readable safetensors weights, tokenizer
    files, and a processor config for a VLM); returns its config. SourceError otherwise."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SourceError(f"model directory {model_dir} does not exist; pass the directory written by "
                          "`evomerge merge` or a run's best/ model")
    config = read_config(model_dir)
    LazyModelReader(model_dir)  # every shard present and its header valid
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")):
        raise SourceError(f"{model_dir} has no tokenizer files (tokenizer.json or tokenizer.model + "
                          "tokenizer_config.json); copy them from the tokenizer source model")
    if is_vision_language(config) and not any((model_dir / f).is_file() for f in PROCESSOR_FILES):
        raise SourceError(f"{model_dir} is a vision-language model but has no preprocessor_config.json; copy the "
                          "processor files from the VLM source model")
    return config


def hub_endpoint(endpoint: str | None = None) -> str | None:
    """``endpoint``, else ``HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# ------------------------------------------------------------------------------ the run


@dataclass
class RunRecord:
    """What the card needs from an evolve run."""

    url: str
    result: dict[str, Any]
    config: dict[str, Any]
    fitness_plot: Path | None = None
    store: Any = None  # the RunStore (None for a record built in memory)


def open_run(url: str, storage_options: dict[str, Any] | None = None):
    """The RunStore of a run URL ``{storage}/{run_key}`` (``file://``, a path or ``s3://``)."""
    stripped = url.rstrip("/")
    storage, sep, run_key = stripped.rpartition("/")
    if not sep or not run_key or storage in ("", "file:/", "file://", "s3:/", "s3://"):
        raise UsageError(f"run URL {url!r} is malformed; pass STORAGE/RUN_KEY, e.g. file:///data/runs/my-run or "
                         "s3://bucket/prefix/my-run")
    return RunStore(storage, run_key, storage_options=storage_options)


def load_run(store, workdir: Path) -> RunRecord:
    """Read ``result.json``, the frozen config and ``report/fitness.png`` of a finished run."""
    result = store.read_json("result.json")
    config = store.read_config()
    if result is None or config is None:
        raise UsageError(f"{store.url()} is not a finished evolve run (no result.json or config.yaml); "
                         "publish after `evomerge evolve` has finished, or leave out --run")
    result = dict(result)
    if not result.get("train_items"):
        try:
            first = store.read_generation(0).get("candidates") or []
            result["train_items"] = next((c.get("n_items") for c in first if c.get("n_items")), None)
        except StorageError:
            pass
    plot = None
    try:
        report = store.get_dir("report", Path(workdir) / "report")
        plot = report / FITNESS_PLOT if (report / FITNESS_PLOT).is_file() else None
    except StorageError:
        plot = None  # a run written with output.report: false has no plot
    return RunRecord(store.url(), result, config, plot, store)


# ------------------------------------------------------------------------------ the card


def _recipe_of(model_dir: Path, run: RunRecord | None) -> dict[str, Any]:
    path = find_recipe(model_dir)  # recipe.yaml, or evomerge_recipe.yaml / evomerge_dfs_recipe.yaml (older writers)
    if path is not None:
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict):
            return data.get("recipe", data) if set(data) == {"recipe"} else data
        raise SourceError(f"{path} is not a recipe mapping; rebuild the model with `evomerge merge`")
    if run is not None and isinstance(run.result.get("best_recipe"), dict):
        return run.result["best_recipe"]
    raise SourceError(f"{model_dir} has no {RECIPE}; publish a directory written by `evomerge merge`/`evomerge evolve`, "
                      "or pass --run so the recipe comes from the run's result.json")


def _mergekit_of(model_dir: Path, recipe: dict[str, Any]) -> str | None:
    """``mergekit.yaml`` of the dir, else the recipe converted when it is a PS (mergekit) recipe."""
    if (model_dir / MERGEKIT).is_file():
        return (model_dir / MERGEKIT).read_text()

    try:
        return to_mergekit_yaml(MergeRecipe.model_validate(recipe))
    except ValidationError:
        return None  # not a mergekit-schema recipe (e.g. a data-flow path)


def _sources(recipe: dict[str, Any], run: RunRecord | None, source_paths: dict[str, str] | None,
             record: dict[str, dict[str, Any]] | None = None):
    """(sources, base ref): from the run config when there is one, else from the recipe. A Hub
    source's commit comes from its pinned revision, its snapshot path, else the model
    directory's `evomerge_sources.json` (written by the merge)."""
    paths = source_paths or {}
    if run is not None and run.config.get("sources"):
        refs = [s["model"] for s in run.config["sources"]]
        base = next((s["model"] for s in run.config["sources"] if s.get("base")), None)
    else:
        refs = list(dict.fromkeys(([recipe["base_model"]] if recipe.get("base_model") else [])
                                  + [m["model"] for m in recipe.get("models") or [] if isinstance(m, dict)]))
        base = recipe.get("base_model")
    if not refs:
        raise SourceError("the recipe names no source models; publish a directory written by evomerge")
    found = []
    for ref in refs:
        src = describe_source(ref, paths.get(ref))
        entry = (record or {}).get(ref) or {}
        if src.repo_id and entry.get("commit") and entry.get("repo_id") == src.repo_id:
            src = replace(src, revision=entry["commit"])
        found.append(src)
    return found, base


def readme_fetcher(token: str | None, endpoint: str | None):
    """``fetch(repo_id, revision) -> text | None``: a source's README.md from the Hub."""
    def fetch(repo_id: str, revision: str | None) -> str | None:
        from huggingface_hub import hf_hub_download  # deferred: ~1 s import; only Hub uploads need it

        from huggingface_hub.errors import HfHubHTTPError  # deferred: ~1 s import; only Hub uploads need it

        try:
            path = hf_hub_download(repo_id, "README.md", revision=revision, token=token or False,
                                   endpoint=hub_endpoint(endpoint))
            return Path(path).read_text(errors="replace")
        except HfHubHTTPError as exc:
            if token and getattr(exc.response, "status_code", None) == 401:  # a bad token: say so, not "unknown"
                raise _hub_error(exc, repo_id, endpoint or "the Hub", token) from None
            return None
        except Exception:  # unreadable: the license counts as unknown, which the caller reports
            return None
    return fetch


@dataclass
class Publication:
    """What will be pushed, before the folder is staged."""

    repo_id: str
    model_dir: Path
    card_text: str
    recipe: dict[str, Any]
    mergekit_yaml: str | None
    run: RunRecord | None = None
    extra: dict[str, str] = field(default_factory=dict)  # name -> text


def plan_publication(model_dir: str | Path, repo_id: str, *, run: RunRecord | None = None,
                     source_paths: dict[str, str] | None = None, license: str | None = None,
                     force_license: bool = False, fetch_readme=None) -> Publication:
    """Check the inputs and build the model card; raises before anything is written."""
    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    config = check_model_dir(model_dir)
    recipe = _recipe_of(model_dir, run)
    mergekit_yaml = _mergekit_of(model_dir, recipe)
    sources, base = _sources(recipe, run, source_paths, read_source_record(model_dir))
    names = public_names(sources)  # no local path reaches the card or the pushed recipe
    recipe, mergekit_yaml = scrub_refs(recipe, names), scrub_yaml_text(mergekit_yaml, names)
    found = [find_license(s, fetch_readme) for s in sources]
    decision = merge_licenses(found, override=license, force=force_license)
    inputs = CardInputs(
        repo_id=repo_id, model_config=config, recipe=recipe, licenses=found, license=decision, base=base,
        mergekit_yaml=mergekit_yaml, result=run.result if run else None, run_config=run.config if run else None,
        fitness_plot=bool(run and run.fitness_plot),
        contamination=describe_contamination(run.config) if run else [],
        evolved=run is not None or _is_evolved_best(model_dir),
    )
    card = build_model_card(inputs)
    extra = {}
    if run is not None:
        extra[RUN_CONFIG] = "# evomerge run config of this model: `evomerge evolve evomerge_config.yaml`\n" + \
            yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True)
    return Publication(repo_id, model_dir, str(card), recipe, mergekit_yaml, run, extra)


def _is_evolved_best(model_dir: Path) -> bool:
    """Whether a model directory is an evolve run's `best/`: only that writes `mergekit.yaml`
    (PS, VLM) or `lineage.yaml` (DFS) beside the recipe (`evomerge merge` writes the recipe alone)."""
    return (model_dir / MERGEKIT).is_file() or (model_dir / LINEAGE).is_file()


# ------------------------------------------------------------------------------ staging


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_weights(model_dir: Path, out: ModelDirWriter, shard_size: int) -> list[str]:
    """Hard-link (or copy) the weights, or reshard them when a file exceeds ``shard_size``."""
    files = weight_files(model_dir)
    if all(f.stat().st_size <= shard_size for f in files):
        names = [f.name for f in files]
        for f in files:
            _link_or_copy(f, out.path / f.name)
        if (model_dir / SAFETENSORS_INDEX).is_file():
            _link_or_copy(model_dir / SAFETENSORS_INDEX, out.path / SAFETENSORS_INDEX)
            names.append(SAFETENSORS_INDEX)
        return names
    reader = LazyModelReader(model_dir)
    plan = [PlannedTensor(n, reader.tensors[n].dtype, reader.tensors[n].shape) for n in reader.names()]
    writer = out.shards(plan, shard_size)  # finished by out.commit(), aborted by the writer on error
    for name in list(writer.expected_names()):
        writer.write(name, reader.get(name))
    return writer.files + ([SAFETENSORS_INDEX] if len(writer.files) > 1 else [])


def stage_folder(pub: Publication, out_dir: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write exactly the folder that is pushed into ``out_dir`` (which must not exist or be
    empty); atomic: a failure leaves no ``out_dir``. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty directory; choose a new folder for the staged upload")
    if shard_size < 1:
        raise UsageError(f"shard size must be positive, not {shard_size}")
    with ModelDirWriter(out_dir) as out:
        tmp = out.path
        _stage_weights(pub.model_dir, out, shard_size)
        out.copy_files(pub.model_dir, (*AUX_FILES, SOURCES_FILE))  # config, generation config, tokenizer and
        for extra in ("*.tiktoken", "tokenizer*"):                 # processor files; the sources' Hub commits
            for f in pub.model_dir.glob(extra):
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        out.write_recipe(yaml.safe_dump(pub.recipe, sort_keys=False, allow_unicode=True))
        if pub.mergekit_yaml:
            (tmp / MERGEKIT).write_text(pub.mergekit_yaml)
        for name, text in pub.extra.items():
            (tmp / name).write_text(text)
        if pub.run is not None and pub.run.fitness_plot is not None:
            shutil.copy2(pub.run.fitness_plot, tmp / FITNESS_PLOT)
        (tmp / "README.md").write_text(pub.card_text)
        out.commit()
    return out_dir


def folder_digest(folder: str | Path) -> str:
    """sha256 over the sorted (relative name, file sha256) pairs of a folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                fh.update(chunk)
        h.update(f"{path.relative_to(folder).as_posix()}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ pushing


def _hub_error(exc: Exception, repo_id: str, endpoint: str, token: str | None) -> PublishError:
    """One clear sentence for a Hub failure (token redacted)."""
    from huggingface_hub.errors import HfHubHTTPError  # deferred: ~1 s import; only Hub uploads need it

    status = getattr(getattr(exc, "response", None), "status_code", None)
    retry = "the local model is unchanged; fix this and run `evomerge publish` again"
    if isinstance(exc, HfHubHTTPError) and status == 401:
        msg = (f"the Hub at {endpoint} rejected the token (HTTP 401); set HF_TOKEN to a valid token with write "
               f"access (or run `hf auth login`); {retry}")
    elif isinstance(exc, HfHubHTTPError) and status == 403:
        msg = (f"the token may not write to {repo_id} (HTTP 403); use a token with write access to the "
               f"{repo_id.split('/')[0]!r} namespace, or publish under your own; {retry}")
    elif isinstance(exc, HfHubHTTPError):
        server = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        msg = f"the Hub refused the upload to {repo_id} (HTTP {status}: {server}); {retry}"
    elif isinstance(exc, ValueError) and "metadata" in str(exc).lower():
        msg = f"the Hub rejected the model card's metadata ({str(exc).splitlines()[-1]}); {retry}"
    else:
        msg = f"cannot upload to {endpoint} ({type(exc).__name__}: {exc}); check the network and HF_ENDPOINT; {retry}"
    return PublishError(redact(msg, token))


def push_folder(folder: str | Path, repo_id: str, *, token: str | None, private: bool = True, revision: str = "main",
                endpoint: str | None = None, commit_message: str | None = None) -> dict[str, Any]:
    """``create_repo(exist_ok=True)`` (+ the branch) and ``upload_folder``; returns
    ``{repo_id, revision, commit_sha, commit_url, url, private}``. An unchanged folder makes no
    new commit (the Hub skips unchanged files) and returns the branch's current commit."""
    from huggingface_hub import HfApi  # deferred: ~1 s import; only Hub uploads need it

    check_repo_id(repo_id)
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    where = api.endpoint
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type="model",
                                 commit_message=commit_message or f"evomerge: publish {repo_id}")
    except Exception as exc:  # huggingface_hub raises many types; each becomes one sentence
        raise _hub_error(exc, repo_id, where, token) from None
    return {"repo_id": repo_id, "revision": revision, "commit_sha": info.oid, "commit_url": info.commit_url,
            "url": str(url), "private": private}


# ------------------------------------------------------------------------------ the marker


def find_publication(store, repo_id: str, revision: str, digest: str) -> dict[str, Any] | None:
    """The recorded push of this exact folder to ``repo_id@revision``, if any."""
    doc = store.read_json(PUBLISHED) or {}
    for push in doc.get("pushes", []):
        if push.get("repo_id") == repo_id and push.get("revision") == revision and push.get("digest") == digest:
            return push
    return None


def record_publication(store, push: dict[str, Any], digest: str) -> dict[str, Any]:
    """Append a push (repo, revision, commit sha, folder digest, time) to ``published.json``."""
    doc = store.read_json(PUBLISHED) or {}
    entry = {**{k: push[k] for k in ("repo_id", "revision", "commit_sha", "url")}, "digest": digest,
             "published_at": time.time()}
    store.write_json(PUBLISHED, {"pushes": [*doc.get("pushes", []), entry]})
    return entry


def publish_model(model_dir: str | Path, repo_id: str, *, private: bool = True, revision: str = "main",
                  dry_run: str | Path | None = None, run: RunRecord | None = None,
                  source_paths: dict[str, str] | None = None, license: str | None = None,
                  force_license: bool = False, token: str | None = None, endpoint: str | None = None,
                  shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """The whole publication without Prefect (the flow runs the same steps as tasks).

    Returns ``{status: "dry-run"|"pushed"|"already-published", folder?, repo_id, commit_sha?, ...}``.
    """
    check_repo_id(repo_id)
    if dry_run is None:
        token = resolve_token(token)
    else:
        try:
            token = resolve_token(token)
        except PublishError:
            token = None  # a dry run pushes nothing; sources' READMEs are then read anonymously
    pub = plan_publication(model_dir, repo_id, run=run, source_paths=source_paths, license=license,
                           force_license=force_license, fetch_readme=readme_fetcher(token, endpoint))
    if dry_run is not None:
        folder = stage_folder(pub, dry_run, shard_size=shard_size)
        return {"status": "dry-run", "folder": str(folder), "repo_id": repo_id, "files": sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())}
    with tempfile.TemporaryDirectory(prefix="evomerge-publish-", dir=_staging_parent(Path(model_dir))) as tmp:
        folder = stage_folder(pub, Path(tmp) / "upload", shard_size=shard_size)
        digest = folder_digest(folder)
        if run is not None and run.store is not None:
            done = find_publication(run.store, repo_id, revision, digest)
            if done is not None:
                return {"status": "already-published", **done}
        push = push_folder(folder, repo_id, token=token, private=private, revision=revision, endpoint=endpoint,
                           commit_message=_commit_message(run))
        if run is not None and run.store is not None:
            record_publication(run.store, push, digest)
        return {"status": "pushed", **push, "digest": digest}


def _commit_message(run: RunRecord | None) -> str:
    if run is None:
        return "evomerge: publish merged model"
    return f"evomerge: publish the best model of run {run.result.get('run_key', run.url)}"


def _staging_parent(model_dir: Path) -> str | None:
    """Stage next to the model (same filesystem: weights are hard-linked) when writable."""
    parent = model_dir.resolve().parent
    return str(parent) if os.access(parent, os.W_OK) else None


def summarise(outcome: dict[str, Any]) -> str:
    """One line for the console."""
    if outcome["status"] == "dry-run":
        return f"dry run: {len(outcome['files'])} files for {outcome['repo_id']} written to {outcome['folder']}; nothing pushed"
    if outcome["status"] == "already-published":
        return (f"{outcome['repo_id']}@{outcome['revision']} already holds this run's model (commit "
                f"{outcome['commit_sha']}); nothing pushed")
    return f"published {outcome['repo_id']}@{outcome['revision']}: commit {outcome['commit_sha']} ({outcome['url']})"


