"""Kernel entries of a spec: a Debian package label, or a kernel densitylab builds or boots.

    kernels:
      - "6.12"                                   # a kernel of the lab image (Debian)
      - {label: mine, build: ../linux/out}       # a built tree (bzImage + .config)
      - {label: pkg, deb: [out/linux-image-6.12.117+dl_amd64.deb]}   # make bindeb-pkg
      - label: patched                            # built by `densitylab kernels build`
        source: {debian: linux-source-6.12}       # or {tree: ../linux}
        patches: [experiments/patches]            # files, or directories of *.patch
        config: {base: tinyconfig, fragment: extra.config}

Relative paths are relative to the directory densitylab runs in (the repository root
for the Makefile targets). Validation only checks shapes; whether paths exist is
checked by orchestrator.kbuild when a kernel is built or booted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

# The same alphabet as spec.NAME_RE: labels become parts of domain names and paths.
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
DEBIAN_SOURCES = ("linux-source-6.12",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_label(v: str) -> str:
    if not LABEL_RE.match(v):
        raise ValueError("label: use letters, digits, '_', '.', '-' (at most 48)")
    return v


def _check_path(v: str) -> str:
    if not v or "\0" in v or "\n" in v:
        raise ValueError("expected a path")
    return v


Label = Annotated[str, Field(min_length=1)]
PathStr = Annotated[str, Field(min_length=1)]


class TreeSource(_Strict):
    tree: PathStr

    _p = field_validator("tree")(classmethod(lambda cls, v: _check_path(v)))


class DebianSource(_Strict):
    """Debian's linux-source-X.Y package (bookworm-security ships 6.12)."""

    debian: Literal["linux-source-6.12"]


class KernelConfig(_Strict):
    """base: tinyconfig, defconfig or a config file; fragment: merged after the lab's own
    fragment (images/labhost/kernel.config), so it can add options or take them away."""

    base: PathStr = "tinyconfig"
    fragment: PathStr | None = None

    _p = field_validator("base", "fragment")(
        classmethod(lambda cls, v: v if v is None else _check_path(v))
    )


def _source_kind(v: Any) -> str | None:
    if isinstance(v, BaseModel):
        return "tree" if isinstance(v, TreeSource) else "debian"
    if isinstance(v, dict):
        return next((k for k in ("tree", "debian") if k in v), None)
    return None


Source = Annotated[
    Annotated[TreeSource, Tag("tree")] | Annotated[DebianSource, Tag("debian")],
    Discriminator(
        _source_kind,
        custom_error_type="kernel_source",
        custom_error_message="expected {tree: PATH} or {debian: linux-source-6.12}",
    ),
]


class SourceKernel(_Strict):
    label: Label
    source: Source
    patches: list[PathStr] = []
    config: KernelConfig = KernelConfig()

    _l = field_validator("label")(classmethod(lambda cls, v: _check_label(v)))
    _p = field_validator("patches")(classmethod(lambda cls, v: [_check_path(p) for p in v]))


class BuildKernel(_Strict):
    label: Label
    build: PathStr

    _l = field_validator("label")(classmethod(lambda cls, v: _check_label(v)))
    _p = field_validator("build")(classmethod(lambda cls, v: _check_path(v)))


class DebKernel(_Strict):
    label: Label
    deb: Annotated[list[PathStr], Field(min_length=1)]

    _l = field_validator("label")(classmethod(lambda cls, v: _check_label(v)))
    _p = field_validator("deb")(classmethod(lambda cls, v: [_check_path(p) for p in v]))


LocalKernel = SourceKernel | BuildKernel | DebKernel


def _kind(v: Any) -> str | None:
    """Which model an entry is, from its keys: errors then name that model's fields
    instead of listing every alternative."""
    if isinstance(v, str):
        return "label"
    if isinstance(v, BaseModel):
        return {SourceKernel: "source-kernel", BuildKernel: "build-kernel"}.get(
            type(v), "deb-kernel"
        )
    if isinstance(v, dict):
        return next((f"{k}-kernel" for k in ("source", "build", "deb") if k in v), None)
    return None


KernelEntry = Annotated[
    Annotated[str, Tag("label")]
    | Annotated[SourceKernel, Tag("source-kernel")]
    | Annotated[BuildKernel, Tag("build-kernel")]
    | Annotated[DebKernel, Tag("deb-kernel")],
    Discriminator(
        _kind,
        custom_error_type="kernel_entry",
        custom_error_message="expected a label or a mapping with label and one of "
        "source, build, deb",
    ),
]


def label_of(entry: KernelEntry) -> str:
    """The label trials, domains and tables name this kernel by."""
    return entry if isinstance(entry, str) else entry.label


def labels(entries: Sequence[KernelEntry]) -> list[str]:
    return [label_of(e) for e in entries]


def entry_for(entries: Sequence[KernelEntry], label: str) -> KernelEntry:
    """The entry with this label; a plain label (a lab-image kernel) when none matches."""
    for e in entries:
        if label_of(e) == label:
            return e
    return label


def origin_kind(entry: KernelEntry) -> Literal["debian", "source", "build", "deb"]:
    if isinstance(entry, str):
        return "debian"
    if isinstance(entry, SourceKernel):
        return "source"
    return "build" if isinstance(entry, BuildKernel) else "deb"
