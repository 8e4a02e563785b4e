"""Search and retrieve (issue 12, part 5) on a catalog of 60 datasets, the expected matches computed here
from the entries the test wrote; and the OpenAPI document, which names every route and which real
responses validate against."""

from __future__ import annotations

import itertools
import re

import jsonschema
import pytest
import requests
from conftest import Server

from bil_transform.cache import Cache
from bil_transform.server import create_app
from bil_transform.workers import Workers

SPECIES = ["mouse", "rat", "marmoset", "human"]
TECHNIQUES = ["fMOST", "light-sheet", "confocal"]
SOURCES = {"slices16": "tiff-stack", "tiled8.tif": "tiff", "float32.zarr": "zarr-v2", "labels.zarr": "zarr-v3"}


@pytest.fixture(scope="module")
def archive(sources):
    _, catalog = sources
    entries, lines = [], []
    for i, (species, technique, (path, fmt)) in enumerate(itertools.islice(
            itertools.cycle(itertools.product(SPECIES, TECHNIQUES, SOURCES.items())), 60)):
        title = f"{'Whole brain' if i % 3 == 0 else 'Brain slab, whole'} {species} scan {i}"
        kind = "labels" if path == "labels.zarr" else "image"
        entries.append({"id": f"ds{i:02d}", "species": species, "technique": technique, "format": fmt,
                        "title": title, "kind": kind})
        lines.append(f'[[datasets]]\nid = "ds{i:02d}"\npath = "{path}"\nkind = "{kind}"\nspecies = "{species}"\n'
                     f'technique = "{technique}"\ntitle = "{title}"\n')
    big = catalog.with_name("catalog-60.toml")
    big.write_text("\n".join(lines))
    srv = Server(big)
    yield srv, entries
    srv.stop()


def _search(srv, **params) -> dict:
    r = requests.get(srv.url("/api/datasets"), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(doc: dict) -> list[str]:
    return [d["id"] for d in doc["datasets"]]


def test_field_qualified_terms_free_words_and_phrases(archive):
    srv, entries = archive
    want = [e["id"] for e in entries if e["species"] == "rat" and e["technique"] == "confocal"]
    assert _ids(_search(srv, q="species:rat technique:CONFOCAL")) == want and want
    # a reader's field: the format it found
    want = [e["id"] for e in entries if "zarr" in e["format"] and e["species"] == "human"]
    assert _ids(_search(srv, q="format:zarr human")) == want and want
    # a phrase matches only as a whole; the same words apart match more
    phrase = [e["id"] for e in entries if "whole brain" in e["title"].lower()]
    words = [e["id"] for e in entries if "whole" in e["title"].lower() and "brain" in e["title"].lower()]
    assert _ids(_search(srv, q='"whole brain"', limit=100)) == phrase
    assert _ids(_search(srv, q="whole brain", limit=100)) == words and len(words) > len(phrase)
    assert _ids(_search(srv, q='title:"brain slab" kind:labels')) == [
        e["id"] for e in entries if "brain slab" in e["title"].lower() and e["kind"] == "labels"]
    assert _search(srv, q="species:dolphin")["total"] == 0


def test_paging_and_facets(archive):
    srv, entries = archive
    mice = [e for e in entries if e["species"] == "mouse"]
    pages = [_search(srv, q="species:mouse", limit=4, offset=o) for o in range(0, len(mice), 4)]
    assert all(p["total"] == len(mice) and p["limit"] == 4 for p in pages)
    assert [i for p in pages for i in _ids(p)] == [e["id"] for e in mice]
    facets = pages[0]["facets"]
    assert facets["species"] == {"mouse": len(mice)}
    for field in ("technique", "format", "kind"):
        assert facets[field] == {v: sum(e[field] == v for e in mice) for v in {e[field] for e in mice}}


def test_retrieve_by_ids_and_bad_requests(archive):
    srv, _ = archive
    assert _ids(_search(srv, id=["ds07", "ds03", "nope"])) == ["ds07", "ds03"]
    for params, says in [({"limit": 0}, "limit must be 1 to 1000"), ({"offset": "x"}, "whole numbers"),
                         ({"q": 'title:"open'}, 'unmatched "')]:
        r = requests.get(srv.url("/api/datasets"), params=params)
        assert r.status_code == 400 and says in r.text


def test_openapi_names_every_route_and_responses_validate(archive, server):
    srv, _ = archive
    doc = requests.get(srv.url("/api/openapi.json")).json()
    app = create_app({}, Cache(1), Workers(1))
    routes = {r.canonical for r in app.router.resources() if not r.canonical.startswith("/token/")}
    assert routes <= set(doc["paths"]), routes - set(doc["paths"])

    def check(instance, schema: str) -> None:
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]},
                            cls=jsonschema.Draft202012Validator)

    check(_search(srv, q="mouse", limit=10), "SearchResult")
    check(requests.get(srv.url("/api/datasets/ds00")).json(), "Dataset")
    check(requests.get(server.url("/api/datasets/ome04")).json(), "Dataset")
    check(requests.get(server.url("/ds/slices16/manifest.json?checksums=sha256")).json(), "Manifest")
    with pytest.raises(jsonschema.ValidationError):
        check({"total": 1}, "SearchResult")


def test_the_index_pages_through_matches_with_facets(archive):
    srv, entries = archive
    def landing_links(page: str) -> list[str]:
        return re.findall(r"href='[^']*/ds/(ds\d\d)/'", page)

    first = requests.get(srv.url("/"), headers={"Accept": "text/html"}).text
    assert "<form" in first and "name=q" in first
    assert len(landing_links(first)) == 50 and f"1 to 50 of {len(entries)}" in first  # one page, never all 60
    assert "offset=50" in first and f"mouse ({sum(e['species'] == 'mouse' for e in entries)})" in first
    second = requests.get(srv.url("/?offset=50")).text
    assert "51 to 60 of 60" in second and landing_links(second) == [f"ds{i}" for i in range(50, 60)]
    rats = requests.get(srv.url("/"), params={"q": "species:rat"}).text
    assert landing_links(rats) == [e["id"] for e in entries if e["species"] == "rat"]
