"""Source identities and licenses of a merged model.

A merged model is a derivative of every source, so its card must carry a license that all the
sources allow. Each source's license is read from its README front matter (``license``,
``license_name``, ``license_link``; the Hub's model card metadata), else from a ``license`` key
in its ``config.json``. The merged license is

- the sources' common license when they all agree (for ``other``: same name and link);
- for a mix of permissive licenses (MIT, BSD, Apache-2.0, CC0, Unlicense), the most demanding
  of them (Apache-2.0 > BSD-3 > BSD-2 > MIT > CC0/Unlicense), whose terms admit the others;
- otherwise (conflicting or unknown licenses) a refusal, unless the user names the license
  (``license=...``) or forces (``force=True``: ``license: other``, ``license_name:
  mixed-source-licenses``, every source's license listed on the card).

This is a conservative helper, not legal advice; the card always lists each source's license.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge_core.errors import EvomergeError

_FRONT_MATTER = re.compile(r"\A\s*---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)
_SNAPSHOT_DIR = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})/?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Most demanding first: the merged license of a permissive mix is the first one present.
PERMISSIVE = ("apache-2.0", "bsd-3-clause", "bsd-2-clause", "mit", "cc0-1.0", "unlicense")
MIXED = "mixed-source-licenses"


class LicenseError(EvomergeError):
    """The sources' licenses are unknown or conflict (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class SourceModel:
    """A source of the merge: the reference used in the recipe, and where it came from."""

    ref: str
    repo_id: str | None = None  # Hub id, when the source is a Hub model
    revision: str | None = None  # pinned revision or the commit sha of the snapshot used
    path: Path | None = None  # local directory, when known

    @property
    def display(self) -> str:
        """How the card names it: ``org/name`` or the local directory's name."""
        if self.repo_id:
            return self.repo_id
        return Path(self.ref.rstrip("/")).name or self.ref


@dataclass(frozen=True)
class SourceLicense:
    """One source's license as found (``license`` None when unknown) and where it was read."""

    source: SourceModel
    license: str | None
    license_name: str | None = None
    license_link: str | None = None
    origin: str = "not found"

    @property
    def label(self) -> str:
        if self.license is None:
            return "unknown"
        if self.license == "other" and self.license_name:
            return f"other ({self.license_name})"
        return self.license


@dataclass(frozen=True)
class LicenseDecision:
    """The merged model's license and a sentence on how it was decided."""

    license: str
    license_name: str | None
    license_link: str | None
    how: str
    sources: tuple[SourceLicense, ...]


def describe_source(ref: str, path: str | Path | None = None) -> SourceModel:
    """Identify a source: a Hub id ``org/name[@rev]`` (the revision, else the commit sha of the
    snapshot directory it was resolved to), or a local directory (a Hub cache snapshot
    ``.../models--org--name/snapshots/<sha>`` is recognised as that Hub model)."""
    local = Path(path) if path is not None else None
    repo_id, _, revision = ref.partition("@")
    if _HUB_ID.match(repo_id) and not Path(ref).expanduser().exists():
        snap = _SNAPSHOT_DIR.search(str(local)) if local is not None else None
        return SourceModel(ref, repo_id, revision or (snap.group("sha") if snap else None), local)
    target = local if local is not None else Path(ref).expanduser()
    snap = _SNAPSHOT_DIR.search(str(target).replace("\\", "/"))
    if snap:
        return SourceModel(ref, f"{snap.group('org')}/{snap.group('name')}", snap.group("sha"), target)
    return SourceModel(ref, None, None, target if target.exists() else None)


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a README (``{}`` when there is none or it is not a mapping)."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _from_metadata(source: SourceModel, meta: dict[str, Any], origin: str) -> SourceLicense | None:
    lic = meta.get("license")
    if isinstance(lic, list):  # some cards list one license as a list
        lic = lic[0] if len(lic) == 1 else None
    if not isinstance(lic, str) or not lic.strip():
        return None
    return SourceLicense(source, lic.strip().lower(), meta.get("license_name"), meta.get("license_link"), origin)


ReadmeFetcher = Callable[[str, "str | None"], "str | None"]


def find_license(source: SourceModel, fetch_readme: ReadmeFetcher | None = None) -> SourceLicense:
    """Read a source's license: local README.md front matter, else the Hub README (through
    ``fetch_readme(repo_id, revision)``), else ``config.json``'s ``license``; else unknown."""
    tried = []
    if source.path is not None and (source.path / "README.md").is_file():
        found = _from_metadata(source, front_matter((source.path / "README.md").read_text(errors="replace")),
                               "README.md front matter")
        if found:
            return found
        tried.append("local README.md has no license")
    if source.repo_id and fetch_readme is not None:
        text = fetch_readme(source.repo_id, source.revision)
        if text is not None:
            found = _from_metadata(source, front_matter(text), "Hub README.md front matter")
            if found:
                return found
            tried.append("Hub README.md has no license")
        else:
            tried.append("Hub README.md not readable")
    if source.path is not None and (source.path / "config.json").is_file():
        try:
            config = json.loads((source.path / "config.json").read_text())
        except ValueError:
            config = {}
        found = _from_metadata(source, config if isinstance(config, dict) else {}, "config.json")
        if found:
            return found
    return SourceLicense(source, None, origin="; ".join(tried) or "no README.md or config.json license")


def merge_licenses(found: list[SourceLicense], *, override: str | None = None, force: bool = False) -> LicenseDecision:
    """Decide the merged model's license (see the module docstring); LicenseError when the
    sources' licenses are unknown or conflict and neither ``override`` nor ``force`` is given."""
    sources = tuple(found)
    if override:
        return LicenseDecision(override.strip().lower(), None, None,
                               "set explicitly by the publisher (not derived from the sources)", sources)
    unknown = [f for f in found if f.license is None]
    kinds = {(f.license, f.license_name, f.license_link) for f in found if f.license is not None}
    if not unknown and len(kinds) == 1:
        lic, name, link = next(iter(kinds))
        return LicenseDecision(lic, name, link, "the license shared by all sources", sources)
    if not unknown and all(k[0] in PERMISSIVE for k in kinds):
        lic = next(p for p in PERMISSIVE if any(k[0] == p for k in kinds))
        return LicenseDecision(lic, None, None, "the most demanding of the sources' permissive licenses "
                               f"({', '.join(sorted(k[0] for k in kinds))}); each source's notices apply", sources)
    if force:
        return LicenseDecision("other", MIXED, None, "forced by the publisher although the sources' licenses "
                               "are unknown or conflict; each source's license applies to its part", sources)
    listing = ", ".join(f"{f.source.display}: {f.label}" for f in found)
    if unknown:
        raise LicenseError(
            f"the license of {unknown[0].source.display} is unknown ({unknown[0].origin}); sources: {listing}. "
            "Add a license to the source's README front matter, pass --license SPDX-ID after checking the "
            "sources' terms, or --force-license to publish with license: other")
    raise LicenseError(
        f"the sources' licenses conflict ({listing}); pass --license SPDX-ID after checking that all sources "
        "allow it, or --force-license to publish with license: other and every source's license listed")
