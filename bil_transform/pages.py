"""What people click: the HTML index, each dataset's links, and Neuroglancer viewer states."""

from __future__ import annotations

import html
import json
import urllib.parse

from .catalog import Dataset

DEFAULT_VIEWER = "https://neuroglancer-demo.appspot.com/"
CHANNEL_SHADER = """#uicontrol invlerp normalized
#uicontrol vec3 color color(default="{color}")
void main() {{ emitRGB(color * normalized()); }}
"""
MAX_LAYERS = 8


def links(ds: Dataset, base: str, viewer: str = DEFAULT_VIEWER, reveal: bool = True) -> dict:
    """Every URL a client may want for this dataset (the `links` of /api/datasets). Without
    `reveal` (an embargoed dataset, no token) the thumbnail and the Neuroglancer state, which
    carry what is computed from the voxels, are left out; the URLs answer 401 until a token comes."""
    root = f"{base}/ds/{ds.spec.id}"
    out = {"self": f"{base}/api/datasets/{ds.spec.id}"}
    if ds.pyramid is None:
        return out
    out.update({view: f"{root}/{view}" for view in ("zarr", "zarr3", "zarr3-sharded", "precomputed",
                                                    "precomputed-sharded")})
    if reveal:
        out["thumbnail"] = f"{root}/thumbnail.png"
    encodings = ds.summary()["precomputed"]["encodings"]
    out.update({f"precomputed-{e}": f"{root}/precomputed-{e}" for e in encodings})
    t, c = ds.pyramid.volume.shape[:2]
    if c > 1:
        out["precomputed_channels"] = [f"{root}/c/{i}/precomputed" for i in range(c)]
    if t > 1:
        out["precomputed_timepoints"] = [f"{root}/t/{i}/precomputed" for i in range(t)]
    if reveal:
        out["neuroglancer"] = neuroglancer_url(ds, base, viewer)
    return out


def neuroglancer_state(ds: Dataset, base: str) -> dict:
    """Layers pointing at this server: one per channel (coloured, additive) for multi-channel images."""
    vol = ds.pyramid.volume
    root = f"precomputed://{base}/ds/{ds.spec.id}"
    if vol.kind == "labels":
        layers = [{"type": "segmentation", "source": f"{root}/precomputed", "name": ds.spec.id}]
    elif vol.shape[1] == 1:
        layers = [{"type": "image", "source": f"{root}/precomputed", "name": ds.spec.id,
                   "shaderControls": {"normalized": {"range": list(ds.pyramid.display_window(0))}}}]
    else:
        layers = [{"type": "image", "source": f"{root}/c/{c}/precomputed", "name": f"{ds.spec.id} {ch.name}",
                   "blend": "additive", "shader": CHANNEL_SHADER.format(color="#" + ch.color.lower()),
                   "shaderControls": {"normalized": {"range": list(ds.pyramid.display_window(c))}}}
                  for c, ch in enumerate(vol.channels[:MAX_LAYERS])]
    return {"layers": layers, "layout": "4panel"}


def neuroglancer_url(ds: Dataset, base: str, viewer: str = DEFAULT_VIEWER) -> str:
    state = json.dumps(neuroglancer_state(ds, base), separators=(",", ":"))
    return f"{viewer}#!{urllib.parse.quote(state, safe='')}"


def index_html(datasets: list[Dataset], base: str, viewer: str = DEFAULT_VIEWER,
               readable: set[str] | None = None) -> str:
    """The index; datasets whose ids are not in `readable` (embargoed, no token) show their
    metadata and URLs, but no thumbnail and no Neuroglancer link."""
    rows = []
    for ds in datasets:
        e = html.escape
        title = e(ds.spec.metadata.get("title", ""))
        if ds.pyramid is None:
            rows.append(f"<tr><td></td><td><b>{e(ds.spec.id)}</b><br>{title}</td>"
                        f"<td colspan=3 class=err>unavailable: {e(ds.public(ds.error or ''))}</td></tr>")
            continue
        vol, served = ds.pyramid.volume, ds.summary()["precomputed"]
        reveal = readable is None or ds.spec.id in readable
        link = links(ds, base, viewer, reveal)
        shape = " &times; ".join(map(str, vol.shape[2:][::-1]))
        extra = ", ".join(f"{n} {a}" for n, a in zip(vol.shape[:2], ("time points", "channels")) if n > 1)
        voxel = " &times; ".join(f"{v:g}" for v in vol.voxel_size[::-1])
        dtype = vol.dtype.name
        if served["data_type"] != dtype:
            dtype += f" (precomputed: {served['data_type']})"
        picture = f"<img src='{e(link['thumbnail'])}' loading=lazy alt='' width=128>" if reveal else "under embargo"
        viewer_link = f"<a href='{e(link['neuroglancer'])}'>open in Neuroglancer</a><br>" if reveal else ""
        rows.append(
            f"<tr><td>{picture}</td>"
            f"<td><b>{e(ds.spec.id)}</b><br>{title}</td>"
            f"<td>{shape} voxels (x &times; y &times; z){'<br>' + extra if extra else ''}<br>{e(dtype)}, "
            f"{vol.kind}<br>{voxel} &micro;m, {len(ds.pyramid.levels)} levels</td>"
            f"<td>{viewer_link}"
            f"OME-Zarr 0.4: <code>{e(link['zarr'])}</code><br>"
            f"OME-Zarr 0.5: <code>{e(link['zarr3'])}</code> (sharded: <code>{e(link['zarr3-sharded'])}</code>)<br>"
            f"precomputed: <code>precomputed://{e(link['precomputed'])}</code> "
            f"({served['encoding']})</td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        "<title>bil-transform</title><style>body{font-family:system-ui,sans-serif;margin:1em;color:#222}"
        "table{border-collapse:collapse}td{padding:.4em .7em;vertical-align:top;border-top:1px solid #ddd}"
        "img{background:#000;image-rendering:pixelated}code{font-size:.85em;word-break:break-all}"
        ".err{color:#a00}</style></head><body><h1>bil-transform</h1>"
        f"<p>{len(datasets)} dataset(s). JSON: <a href='/api/datasets'>/api/datasets</a></p>"
        "<table>" + "".join(rows) + "</table></body></html>"
    )
