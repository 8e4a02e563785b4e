"""The OpenAPI 3.1 description of every route, served at /api/openapi.json (a test checks that it
names every route the app has, and validates real responses against its schemas)."""

from __future__ import annotations

ERROR = {"description": "One sentence saying what is wrong", "content": {"text/plain": {"schema": {"type": "string"}}}}
UNAUTHORIZED = {"401": {**ERROR, "description": "The dataset is under embargo and no token was sent"},
                "403": {**ERROR, "description": "The token sent does not open this dataset"}}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
VIEW = {"name": "view", "in": "path", "required": True, "description":
        "zarr, zarr3, zarr3-sharded or precomputed, precomputed-sharded, optionally followed by -COMPRESSOR "
        "(zarr views) or -ENCODING (precomputed views); under /ds/{id}/ also a zarr view's alias ending in .zarr: "
        "ID.ome.zarr (zarr) or ID.VIEW.ome.zarr (ID.zarr3.ome.zarr, ...)", "schema": {"type": "string"}}
KEY = {"name": "key", "in": "path", "required": True, "description":
       "a store key: metadata document, chunk or shard; a directory (empty or ending in /) answers an HTML "
       "index of the names directly under it",
       "schema": {"type": "string"}}
BYTES = {"200": {"description": "The bytes (byte ranges answer 206), or a directory's HTML index",
                 "content": {"application/octet-stream": {}, "application/json": {}, "text/html": {}}},
         "304": {"description": "Not modified (If-None-Match)"}, "400": ERROR, "404": ERROR, **UNAUTHORIZED}


def _json(schema: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _view(prefix: str, extra: list[dict]) -> dict:
    return {"get": {"summary": f"A key of a format view{prefix}", "parameters": [ID, *extra, VIEW, KEY],
                    "responses": BYTES}}


def document() -> dict:
    channel = {"name": "c", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
    time = {"name": "t", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
    query = {"name": "q", "in": "query", "schema": {"type": "string"}, "description":
             'terms ANDed: field:value, a bare word (any field) or a "quoted phrase"'}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bil-transform", "version": "1", "description":
                 "Microscopy volumes served on the fly as OME-Zarr and Neuroglancer precomputed. Every path also "
                 "answers under /token/TOKEN/ (for an embargoed dataset, instead of 'Authorization: Bearer TOKEN')."},
        "paths": {
            "/": {"get": {"summary": "The HTML index", "responses": {"200": {"description": "HTML"}}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "Readiness: how many datasets can be served", "responses": {
                "200": {"description": "ready: N of M datasets can be served"},
                "503": {"description": "none can be served"}}}},
            "/metrics": {"get": {"summary": "Prometheus counters", "responses": {"200": {"description": "text"}}}},
            "/api/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "JSON"}}}},
            "/api/datasets": {"get": {
                "summary": "Search the catalog, or retrieve datasets by id",
                "parameters": [query, {"name": "id", "in": "query", "schema": {"type": "array", "items": {
                    "type": "string"}}, "style": "form", "explode": True},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": _json("SearchResult", "A page of matches"), "400": ERROR}}},
            "/api/datasets/{id}": {"get": {
                "summary": "One dataset's metadata and links; an image lists its skeleton sources, a skeleton "
                           "source its neurons (those matching q)", "parameters": [ID, query],
                "responses": {"200": _json("Dataset", "The dataset"), "400": ERROR, "404": ERROR}}},
            "/ds/{id}/thumbnail.png": {"get": {"summary": "A small picture", "parameters": [ID], "responses": {
                "200": {"description": "PNG", "content": {"image/png": {}}}, "404": ERROR, **UNAUTHORIZED}}},
            "/ds/{id}/manifest.json": {"get": {
                "summary": "The source files", "parameters": [ID, {"name": "checksums", "in": "query", "schema": {
                    "enum": ["sha256"]}}],
                "responses": {"200": _json("Manifest", "Streamed file by file"), "400": ERROR, **UNAUTHORIZED}}},
            "/ds/{id}/region": {"get": {
                "summary": "Any box of any level",
                "parameters": [ID] + [{"name": n, "in": "query", "schema": {"type": "string"}, "description": d}
                                      for n, d in [("level", "level number"), ("z", "START:STOP"),
                                                   ("y", "START:STOP"), ("x", "START:STOP"),
                                                   ("t", "T or START:STOP"), ("c", "C, START:STOP or C,C,..."),
                                                   ("coords", "level or full"), ("format", "npy, tiff or raw")]],
                "responses": {"200": {"description": "npy, ImageJ TIFF or raw (X-Shape, X-Dtype)",
                                      "content": {"application/octet-stream": {}, "image/tiff": {}}},
                              "400": ERROR, "413": ERROR, "503": ERROR, **UNAUTHORIZED}}},
            "/ds/{id}/": {"get": {"summary": "The dataset's landing page", "parameters": [ID], "responses": {
                "200": {"description": "HTML"}, "404": ERROR}}},
            "/ds/{id}": {"get": {"summary": "The landing page too", "parameters": [ID], "responses": {
                "200": {"description": "HTML"}, "404": ERROR}}},
            **{f"/ds/{{id}}{selector}/{{view}}": {"get": {
                "summary": "A view's root: the landing page for a browser loading a page, else a redirect to "
                           "the root's listing (VIEW/)",
                "parameters": [ID, *extra, VIEW], "responses": {"200": {"description": "HTML"},
                                                                "307": {"description": "To VIEW/"}, "404": ERROR}}}
               for selector, extra in (("", []), ("/c/{c}", [channel]), ("/t/{t}", [time]),
                                       ("/t/{t}/c/{c}", [time, channel]))},
            "/ds/{id}/skeletons/{key}": {"get": {
                "summary": "A skeleton source's Neuroglancer precomputed skeletons: info, "
                           "segment_properties/info, or a neuron's skeleton by its segment id",
                "parameters": [ID, {**KEY, "description": "info, segment_properties/info or a segment id"}],
                "responses": {**BYTES, "503": {**ERROR, "description": "The neuron's SWC file is malformed (the "
                                                                    "file and line are named); retried later"}}}},
            "/ds/{id}/info": {"get": {
                "summary": "A skeleton source as a segmentation volume with no voxels, naming its skeletons "
                           "(what cloud-volume opens)",
                "parameters": [ID], "responses": {"200": {"description": "JSON", "content": {"application/json": {}}},
                                                  "304": BYTES["304"], "404": ERROR, **UNAUTHORIZED}}},
            "/ds/{id}/{view}/{key}": _view("", []),
            "/ds/{id}/c/{c}/{view}/{key}": _view(", one channel", [channel]),
            "/ds/{id}/t/{t}/{view}/{key}": _view(", one time point", [time]),
            "/ds/{id}/t/{t}/c/{c}/{view}/{key}": _view(", one time point and channel", [time, channel]),
        },
        "components": {"schemas": {
            "Summary": {"type": "object", "required": ["id", "kind", "embargo", "status", "links"], "properties": {
                "id": {"type": "string"}, "kind": {"enum": ["image", "labels", "skeletons"]},
                "embargo": {"type": "boolean", "description": "Whether its data need a token: its own embargo, or "
                            "that of an image it is attached to (its labels, a skeleton source's space)"},
                "status": {"enum": ["ok", "error"]}, "error": {"type": "string"}, "format": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 5},
                "dtype": {"type": "string"}, "voxel_size": {"type": "array", "items": {"type": "number"}},
                "levels": {"type": "array", "items": {"type": "object", "required": ["shape", "factors", "chunks"]}},
                "space": {"type": "string"}, "units": {"enum": ["micrometer", "voxel"]},
                "neuron_count": {"type": "integer"}, "unavailable_neurons": {"type": "integer"},
                "notes": {"type": "array", "items": {"type": "string"}},
                "links": {"type": "object", "additionalProperties": {
                    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                              {"type": "object", "additionalProperties": {"type": "string"}}]}}}},
            "Dataset": {"allOf": [{"$ref": "#/components/schemas/Summary"}, {"type": "object", "properties": {
                "channels": {"type": "array", "items": {"type": "object", "required": ["name", "color"]}},
                "skeletons": {"type": "array", "items": {"type": "object", "required": ["id", "kind", "status"]}},
                "neurons": {"type": "array", "items": {"type": "object", "required": ["id", "segid", "file", "status"],
                                                       "properties": {"segid": {"type": "integer", "minimum": 1}}}},
            }}]},
            "SearchResult": {"type": "object", "required": ["total", "offset", "limit", "datasets", "facets"],
                             "properties": {
                                 "total": {"type": "integer"}, "offset": {"type": "integer"},
                                 "limit": {"type": "integer"},
                                 "datasets": {"type": "array", "items": {"$ref": "#/components/schemas/Summary"}},
                                 "facets": {"type": "object", "additionalProperties": {
                                     "type": "object", "additionalProperties": {"type": "integer"}}}}},
            "Manifest": {"type": "object", "required": ["id", "files"], "properties": {
                "id": {"type": "string"}, "files": {"type": "array", "items": {
                    "type": "object", "required": ["name", "size", "mtime"], "properties": {
                        "name": {"type": "string"}, "size": {"type": "integer"}, "mtime": {"type": "string"},
                        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}}}},
        }},
    }
