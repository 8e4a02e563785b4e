"""Who may read an embargoed dataset's voxels: the one access check every voxel route passes.

Tokens come from the operator's file (`--tokens FILE`), never from the catalog, which may be
published. Each entry is a token, or its sha256, and the dataset ids (or "*") it opens:

    [[tokens]]
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    datasets = ["mouse-001", "mouse-002"]

    [[tokens]]
    token = "curator-secret"
    datasets = ["*"]

Only the sha256 of a token is kept in memory; comparisons take constant time.

One rule says whose embargo a dataset's data fall under (`governing`): its own, and that of every
image it is shown with, so an image's embargo cannot be side-stepped through a dataset attached to
it. The server's checks, the API's "embargo" and the viewer states all ask it.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dataset import Dataset


class TokensError(ValueError):
    """The tokens file is wrong; the message says where and how to fix it."""


class AccessDenied(Exception):
    """A request may not read this dataset's voxels: 401 without a token, 403 with one that does
    not open it. The message never repeats the token."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tokens:
    grants: tuple[tuple[str, frozenset[str]], ...] = ()  # (sha256 hex of a token, dataset ids or "*")

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TokensError(f"{path}: cannot read the tokens file ({exc})") from exc
        grants = []
        for i, entry in enumerate(doc.get("tokens", [])):
            where = f"{path}: tokens[{i}]"
            if not isinstance(entry, dict):
                raise TokensError(f"{where}: each entry is a table: [[tokens]]")
            token, digest = entry.get("token"), entry.get("sha256")
            if (token is None) == (digest is None):
                raise TokensError(f"{where}: give exactly one of 'token' or 'sha256'")
            if token is not None and (not isinstance(token, str) or len(token) < 8 or "/" in token):
                raise TokensError(f"{where}: a token is a string of at least 8 characters without '/'")
            if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                           and all(ch in "0123456789abcdef" for ch in digest.lower())):
                raise TokensError(f"{where}: 'sha256' is 64 hexadecimal digits")
            datasets = entry.get("datasets")
            if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
                raise TokensError(f"{where}: 'datasets' is a list of dataset ids, or [\"*\"] for all")
            grants.append((_digest(token) if token is not None else digest.lower(), frozenset(datasets)))
        return cls(tuple(grants))

    def opens(self, token: str, dataset: str) -> bool:
        presented = _digest(token)
        return any(hmac.compare_digest(presented, digest) and ("*" in ids or dataset in ids)
                   for digest, ids in self.grants)


def check(dataset: str, embargo: bool, token: str | None, tokens: Tokens) -> None:
    """Raise AccessDenied unless this request may read the dataset's voxels."""
    if not embargo:
        return
    if token is None:
        raise AccessDenied(401, f"Dataset {dataset!r} is under embargo: send a token that opens it, as "
                                "'Authorization: Bearer TOKEN' or with /token/TOKEN/ in front of the path")
    if not tokens.opens(token, dataset):
        raise AccessDenied(403, f"The token sent does not open dataset {dataset!r}, which is under embargo")


def governing(ds: Dataset) -> tuple[Dataset, ...]:
    """The datasets whose embargo rules a dataset's data fall under, images first: a skeleton
    source's image (its `space`: tracings are shown on the brain, and reveal it), a label
    dataset's images (every image whose catalog `labels` list it: it is their anatomy, served in
    their labels/ groups), then the dataset itself."""
    images = (ds.space,) if ds.space is not None else ds.images
    return (*images, ds)


def embargoed(ds: Dataset) -> bool:
    """The effective embargo: whether reading this dataset's data takes a token."""
    return any(each.spec.embargo for each in governing(ds))


def check_dataset(ds: Dataset, token: str | None, tokens: Tokens) -> None:
    """Raise AccessDenied unless this request may read the dataset's data: a token must open
    every embargoed dataset that governs it (the image's token opens a public label or skeleton
    source attached to it)."""
    for each in governing(ds):
        check(each.spec.id, each.spec.embargo, token, tokens)


def readable(ds: Dataset, token: str | None, tokens: Tokens) -> bool:
    try:
        check_dataset(ds, token, tokens)
    except AccessDenied:
        return False
    return True
