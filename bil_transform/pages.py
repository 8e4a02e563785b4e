"""What people click: the HTML index, each dataset's links, and Neuroglancer viewer states."""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Mapping, Sequence

from . import access, records
from .dataset import Dataset
from .writers import precomputed_encodings
from .writers.listing import suffixed

DEFAULT_VIEWER = "https://neuroglancer-demo.appspot.com/"
CHANNEL_SHADER = """#uicontrol invlerp normalized
#uicontrol vec3 color color(default="{color}")
void main() {{ emitRGB(color * normalized()); }}
"""
MAX_LAYERS = 8
# Neurons' colours in the viewer: bright and far apart on black and on grey tissue
NEURON_COLORS = ("#ff4040", "#40ff40", "#4080ff", "#ffff40", "#ff40ff", "#40ffff", "#ff9020", "#b060ff")
SUFFIXED = ("zarr", "zarr3", "zarr3-sharded")  # zarr views that links also give as ID[.VIEW].ome.zarr


def links(ds: Dataset, base: str, viewer: str = DEFAULT_VIEWER, reveal: bool = True,
          skeletons: Sequence[Dataset] = (), labels: Sequence[str] | None = None) -> dict:
    """Every URL a client may want for this dataset (the `links` of /api/datasets); one channel's or
    time point's view as a template with {c} or {t} to fill in. Without
    `reveal` (an embargoed dataset, no token) the thumbnail and the Neuroglancer state, which
    carry what is computed from the voxels, are left out; the URLs answer 401 until a token comes.
    `skeletons`: the open skeleton sources the image's Neuroglancer state shows with it; `labels`:
    the attached labels it shows (those the request may read; None: all)."""
    root = f"{base}/ds/{ds.spec.id}"
    out = {"self": f"{base}/api/datasets/{ds.spec.id}"}
    snap = ds.snapshot  # one version throughout, though a reopen may swap it meanwhile
    if ds.spec.kind == "skeletons":
        return {**out, **_skeleton_links(ds, base, viewer, reveal, labels)}
    if snap.pyramid is None:
        return out
    out.update({view: f"{root}/{view}" for view in ("zarr", "zarr3", "zarr3-sharded", "precomputed",
                                                    "precomputed-sharded")})
    # the same zarr views under names ending in .zarr, for readers that choose by suffix
    out.update({f"{view}_suffixed": f"{root}/{suffixed(ds.spec.id, view)}" for view in SUFFIXED})
    if reveal:
        out["thumbnail"] = f"{root}/thumbnail.png"
    encodings = precomputed_encodings(snap.pyramid)
    out.update({f"precomputed-{e}": f"{root}/precomputed-{e}" for e in encodings})
    t, c = snap.pyramid.volume.shape[:2]  # templates, not one URL each: a document stays small however many
    if c > 1:
        out["precomputed_c"] = f"{root}/c/{{c}}/precomputed"
    if t > 1:
        out["precomputed_t"] = f"{root}/t/{{t}}/precomputed"
    if skeletons:
        out["skeletons"] = {s.spec.id: f"precomputed://{base}/ds/{s.spec.id}/skeletons" for s in skeletons}
    if reveal:
        out["neuroglancer"] = neuroglancer_url(ds, base, viewer, skeletons, labels)
    return out


def _skeleton_links(source: Dataset, base: str, viewer: str, reveal: bool, labels: Sequence[str] | None) -> dict:
    """A skeleton source's URLs: its skeletons, the volume cloud-volume opens, its original files,
    its image, and (to those who may see them) the image in Neuroglancer with these neurons on it."""
    root = f"{base}/ds/{source.spec.id}"
    out = {"skeletons": f"precomputed://{root}/skeletons", "precomputed": f"precomputed://{root}",
           "manifest": f"{root}/manifest.json", "space": f"{base}/api/datasets/{source.spec.space}"}
    image = source.space
    if reveal and source.tracings is not None and image is not None and image.pyramid is not None:
        out["neuroglancer"] = neuroglancer_url(image, base, viewer, [source], labels)
    return out


def neuroglancer_state(ds: Dataset, base: str, skeletons: Sequence[Dataset] = (),
                       labels: Sequence[str] | None = None) -> dict:
    """Layers pointing at this server: one per channel (coloured, additive) for multi-channel images;
    over them the attached labels (of those, `labels` only, when given: a layer the viewer's user
    may not read would only fail), and each skeleton source with all its neurons shown."""
    pyramid = ds.pyramid
    vol = pyramid.volume
    root = f"precomputed://{base}/ds/{ds.spec.id}"
    if vol.kind == "labels":
        layers = [{"type": "segmentation", "source": f"{root}/precomputed", "name": ds.spec.id}]
    elif vol.shape[1] == 1:
        layers = [{"type": "image", "source": f"{root}/precomputed", "name": ds.spec.id,
                   "shaderControls": {"normalized": {"range": list(pyramid.display_window(0))}}}]
    else:
        layers = [{"type": "image", "source": f"{root}/c/{c}/precomputed", "name": f"{ds.spec.id} {ch.name}",
                   "blend": "additive", "shader": CHANNEL_SHADER.format(color="#" + ch.color.lower()),
                   "shaderControls": {"normalized": {"range": list(pyramid.display_window(c))}}}
                  for c, ch in enumerate(vol.channels[:MAX_LAYERS])]
    # attached labels, over the image: the OME-Zarr label groups place each on its image level
    layers += [{"type": "segmentation", "source": f"zarr://{base}/ds/{ds.spec.id}/zarr/labels/{name}/", "name": name}
               for name in ds.spec.labels if labels is None or name in labels]
    layers += [skeleton_layer(source, base) for source in skeletons if source.tracings is not None]
    return {"layers": layers, "layout": "4panel"}


def skeleton_layer(source: Dataset, base: str) -> dict:
    """A segmentation layer of a skeleton source's skeletons, every served neuron shown in a
    colour of its own (in segment id order, so a neuron keeps its colour across links)."""
    segids = sorted(t.segid for t in source.tracings.neurons if t.error is None)
    return {"type": "segmentation", "source": f"precomputed://{base}/ds/{source.spec.id}/skeletons",
            "name": source.spec.id, "segments": [str(i) for i in segids],
            "segmentColors": {str(i): NEURON_COLORS[n % len(NEURON_COLORS)] for n, i in enumerate(segids)}}


def neuroglancer_url(ds: Dataset, base: str, viewer: str = DEFAULT_VIEWER, skeletons: Sequence[Dataset] = (),
                     labels: Sequence[str] | None = None) -> str:
    state = json.dumps(neuroglancer_state(ds, base, skeletons, labels), separators=(",", ":"))
    return f"{viewer}#!{urllib.parse.quote(state, safe='')}"


STYLE = ("body{font-family:system-ui,sans-serif;margin:1em;color:#222;max-width:75em}"
         "table{border-collapse:collapse}td,th{padding:.4em .7em;vertical-align:top;border-top:1px solid #ddd;"
         "text-align:left}img{background:#000;image-rendering:pixelated}code{font-size:.85em;word-break:break-all}"
         ".err{color:#a00}.facet a{margin-right:.8em}button{font-size:.75em}")
COPY = "<button onclick='navigator.clipboard.writeText(this.previousElementSibling.textContent)'>copy</button>"


def _page(title: str, body: str) -> str:
    return ("<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>")


def _facts(ds: Dataset) -> str:
    """Shape, type, voxel size, levels and the format it is read from, in one line of HTML."""
    vol, served = ds.pyramid.volume, records.summary(ds)["precomputed"]
    shape = " &times; ".join(map(str, vol.shape[2:][::-1]))
    extra = ", ".join(f"{n} {a}" for n, a in zip(vol.shape[:2], ("time points", "channels")) if n > 1)
    voxel = " &times; ".join(f"{v:g}" for v in vol.voxel_size[::-1])
    dtype = vol.dtype.name + (f" (precomputed: {served['data_type']})" if served["data_type"] != vol.dtype.name
                              else "")
    return (f"{shape} voxels (x &times; y &times; z){', ' + extra if extra else ''}; {html.escape(dtype)}, "
            f"{vol.kind}; {voxel} &micro;m; {len(ds.pyramid.levels)} levels; read from {html.escape(vol.format)}")


def index_html(found: list[Dataset], total: int, offset: int, limit: int, facets: dict, query: str, base: str,
               shown: Mapping[str, tuple[bool, dict]]) -> str:
    """One page of the catalog (a search's matches), with the search box, the facets of all matches
    and links to each dataset's landing page. `shown`: for each dataset, whether this request may
    read it (else it shows no thumbnail) and its links."""
    e, q = html.escape, urllib.parse.quote_plus
    rows = []
    for ds in found:
        landing = f"{base}/ds/{ds.spec.id}/"
        title = e(ds.spec.metadata.get("title", ""))
        if ds.error is not None:
            rows.append(f"<tr><td></td><td><a href='{e(landing)}'><b>{e(ds.spec.id)}</b></a><br>{title}</td>"
                        f"<td class=err>unavailable: {e(ds.public(ds.error or ''))}</td></tr>")
            continue
        reveal, link = shown[ds.spec.id]
        if ds.tracings is not None:
            viewer_link = f"<a href='{e(link['neuroglancer'])}'>open on its brain in Neuroglancer</a><br>" \
                if "neuroglancer" in link else ""
            rows.append(f"<tr><td>{'under embargo' if not reveal else ''}</td><td><a href='{e(landing)}'>"
                        f"<b>{e(ds.spec.id)}</b></a><br>{title}</td><td>{_tracing_facts(ds, base)}</td>"
                        f"<td>{viewer_link}<code>{e(link['skeletons'])}</code></td></tr>")
            continue
        picture = (f"<img src='{e(link['thumbnail'])}' loading=lazy alt='' width=96>" if reveal
                   else "under embargo" if access.embargoed(ds) else "")
        viewer_link = f"<a href='{e(link['neuroglancer'])}'>open in Neuroglancer</a><br>" if reveal else ""
        encoding = records.summary(ds)["precomputed"]["encoding"]
        rows.append(f"<tr><td>{picture}</td><td><a href='{e(landing)}'><b>{e(ds.spec.id)}</b></a><br>{title}</td>"
                    f"<td>{_facts(ds)}</td><td>{viewer_link}<code>precomputed://{e(link['precomputed'])}</code> "
                    f"({encoding})</td></tr>")
    facet_lines = "".join(
        f"<p class=facet>{name}: " + "".join(
            f"<a href='{e(base)}/?q={q((query + ' ' + name + ':' + _quoted(v)).strip())}'>{e(v)} ({n})</a>"
            for v, n in counts.items()) + "</p>"
        for name, counts in facets.items() if counts)
    pages = []
    if offset > 0:
        pages.append(f"<a href='{e(base)}/?q={q(query)}&offset={max(0, offset - limit)}'>previous</a>")
    if offset + limit < total:
        pages.append(f"<a href='{e(base)}/?q={q(query)}&offset={offset + limit}'>next</a>")
    shown = f"{offset + 1} to {offset + len(found)} of {total}" if found else f"none of {total}"
    return _page("bil-transform", (
        "<h1>bil-transform</h1>"
        f"<form action='{e(base)}/' method=get><input name=q size=50 value='{e(query)}' "
        "placeholder='species:mouse technique:fMOST \"whole brain\"'> <button>search</button></form>"
        f"{facet_lines}<p>Datasets {shown}. {' '.join(pages)} JSON: "
        f"<a href='{e(base)}/api/datasets?q={q(query)}'>/api/datasets</a></p>"
        "<table>" + "".join(rows) + "</table>"))


def _tracing_facts(source: Dataset, base: str) -> str:
    """How many neurons, on which image, in one line of HTML."""
    neurons = source.tracings.neurons
    bad = sum(t.error is not None for t in neurons)
    served = len(neurons) - bad
    return (f"{served} traced neuron{'s' if served != 1 else ''} (SWC) on "
            f"<a href='{html.escape(base)}/ds/{html.escape(source.spec.space)}/'>{html.escape(source.spec.space)}</a>"
            + (f"; <span class=err>{bad} unavailable</span>" if bad else ""))


def _quoted(value: str) -> str:
    return f'"{value}"' if " " in value else value


def landing_html(ds: Dataset, base: str, reveal: bool, link: dict, traced: Sequence[Dataset] = ()) -> str:
    """A dataset's page for people: what it is, and for each view its URL and the line that opens it;
    the skeleton sources traced on an image, or a skeleton source's neurons."""
    e = html.escape
    root = f"{base}/ds/{ds.spec.id}"
    meta = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in ds.spec.metadata.items())
    head = f"<h1>{e(ds.spec.id)}</h1><p>{e(ds.spec.metadata.get('title', ''))}</p>"
    foot = (f"<p>JSON: <a href='{e(link['self'])}'>{e(link['self'])}</a> &middot; "
            f"<a href='{e(base)}/'>all datasets</a></p>")
    if ds.error is not None:
        return _page(ds.spec.id, head + f"<p class=err>unavailable: {e(ds.public(ds.error or ''))}</p>"
                     f"<table>{meta}</table>{foot}")

    def line(label: str, text: str) -> str:
        return f"<tr><th>{label}</th><td><code>{e(text)}</code> {COPY}</td></tr>"

    viewer_link = (f"<p><a href='{e(link['neuroglancer'])}'>open in Neuroglancer</a></p>"
                   if "neuroglancer" in link else "")
    if ds.tracings is not None:
        return _page(ds.spec.id, head + _tracings_html(ds, base, reveal, link, line, viewer_link)
                     + f"<table>{meta}</table>{foot}")
    picture = f"<img src='{e(link['thumbnail'])}' alt='' width=256>" if reveal else (
        "<p>Under embargo: its voxels need a token.</p>" if access.embargoed(ds) else "")
    # napari-ome-zarr claims only paths ending in .zarr: the bare /zarr view is "no compatible reader"
    ways = [line("napari", f"napari --plugin napari-ome-zarr {link['zarr_suffixed']}"),
            line("zarr-python", f"import zarr; level0 = zarr.open_group('{root}/zarr', mode='r')['0']"),
            line("bioio", f"from bioio import BioImage; img = BioImage('{link['zarr_suffixed']}')  "
                          "# pip install bioio bioio-ome-zarr"),
            line("Python client", f"from bil_transform.client import open_dataset; ds = open_dataset('{root}')"),
            line("Neuroglancer", f"precomputed://{root}/precomputed")]
    if "neuroglancer" in link:
        ways.append(f"<tr><th></th><td><a href='{e(link['neuroglancer'])}'>open in Neuroglancer</a>"
                    + (" (with its traced neurons)" if "skeletons" in link else "") + "</td></tr>")
    views = "".join(line(view, link[view]) for view in ("zarr", "zarr3", "zarr3-sharded", "precomputed",
                                                          "precomputed-sharded"))
    views += "".join(line(f"{view}, named .zarr", link[f"{view}_suffixed"]) for view in SUFFIXED)
    tracings = "".join(
        f"<tr><td><a href='{e(base)}/ds/{e(s.spec.id)}/'><b>{e(s.spec.id)}</b></a> "
        f"{e(s.spec.metadata.get('title', ''))}</td><td>"
        + (f"<span class=err>unavailable: {e(s.public(s.error))}</span>" if s.error is not None
           else _tracing_facts(s, base)) + "</td></tr>" for s in traced)
    return _page(ds.spec.id, (
        f"{head}{picture}<p>{_facts(ds)}</p><table>{meta}</table>"
        f"<h2>Open it</h2><table>{''.join(ways)}</table><h2>Views</h2><table>{views}</table>"
        + (f"<h2>Traced neurons</h2><table>{tracings}</table>" if traced else "") + foot))


def _tracings_html(source: Dataset, base: str, reveal: bool, link: dict, line, viewer_link: str) -> str:
    """A skeleton source's part of its page: how to open it, and its neurons (to those who may see them)."""
    e = html.escape
    ways = (line("Neuroglancer", link["skeletons"]) + line("cloud-volume", (
        f"from cloudvolume import CloudVolume; skeleton = CloudVolume('{link['precomputed']}').skeleton.get(SEGID)"))
        + line("original SWC files", link["manifest"]))
    parts = [f"<p>{_tracing_facts(source, base)}</p>", viewer_link, f"<h2>Open it</h2><table>{ways}</table>"]
    if not reveal:
        parts.append("<p>Under embargo: its neurons need a token.</p>")
        return "".join(parts)
    rows = []
    for t in source.tracings.neurons:
        if t.error is not None:
            rows.append(f"<tr><td>{e(t.name)}</td><td>{t.segid}</td><td>{e(t.file)}</td>"
                        f"<td colspan=3 class=err>unavailable: {e(source.public(t.error))}</td></tr>")
            continue
        m = t.measures
        soma = ", ".join(f"{v:.1f}" for v in m.soma)
        rows.append(f"<tr><td>{e(t.name)}</td><td>{t.segid}</td><td>{e(t.file)}</td><td>{m.nodes}</td>"
                    f"<td>{m.cable_length:.1f}</td><td>{soma}</td></tr>")
    parts.append("<h2>Neurons</h2><table><tr><th>identifier</th><th>segment</th><th>file</th><th>nodes</th>"
                 "<th>cable (&micro;m)</th><th>soma x, y, z (&micro;m)</th></tr>" + "".join(rows) + "</table>")
    return "".join(parts)
