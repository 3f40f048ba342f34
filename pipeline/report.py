"""report.html: one self-contained HTML page rendered from reports/{run}/metrics.json.

Everything the page shows comes from metrics.json (schema: pipeline/schemas/metrics.schema.yaml)
and from the artifacts it names under `artifacts` (paths relative to the working directory):

    artifacts.grids       {"digit": ".../samples/digit/grid.png", "vq": ".../samples/vq/grid.png"}
    artifacts.training    {"digit"|"vq"|"stage2": ".../checkpoints/<model>/metrics.jsonl"}
    artifacts.vq_history  .../vq/vq.json            (a "history" list of per-epoch dicts)
    artifacts.encoder     .../encoder/encoder.json  (a "history" list of per-epoch dicts)

Images are embedded as base64 PNG, plots are drawn with matplotlib (Agg, no pyplot state) and
embedded the same way; no external resources, no JavaScript. A missing or unreadable artifact
gives a "not available" panel, never an exception. The page depends only on its inputs (no clock,
PNG metadata stripped), so the same metrics.json renders to the same bytes.

Page assembly lives here; `report_html` has the HTML helpers and artifact loading, `report_plots`
the plotted sections (training, stability, linear probe).

    python -m pipeline.report reports/default/metrics.json reports/default/report.html
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .config import ConfigError
from .evaluate import metrics_stage
from .io import read_json, write_bytes_atomic
from .report_html import (NOT_AVAILABLE, Missing, artifact_path, esc, guard, html_table, image_mime, img_tag, kv,
                          model_label, n_badge, n_text, na, num, section)
from .report_plots import probe_section, stability_section, training_section

__all__ = ["NOT_AVAILABLE", "render_html", "write_report", "main"]

HEADLINE = [  # (metric, column title, digits, "lower/higher is better")
    ("fid", "FID", 2, "↓"),
    ("kid", "KID ×10³", 2, "↓"),
    ("is_mean", "IS", 2, "↑"),
    ("precision", "Precision", 3, "↑"),
    ("recall", "Recall", 3, "↑"),
    ("fd_dinov2", "FD<sub>DINOv2</sub>", 2, "↓"),
]
OPTIONAL_HEADLINE = ("kid", "fd_dinov2")   # columns shown only when some figure has them
KID_SCALE = 1e3                            # KID is shown x 10^3, as StyleGAN2-ADA and most papers
OTHER_METRIC_LABELS = {"vq_psnr": "VQ reconstruction PSNR (dB)", "encoder_accuracy": "encoder test accuracy",
                       "final_loss": "final training loss", "probe_top1": "linear-probe top-1"}

CSS = """
:root { --fg:#1d2330; --muted:#6b7385; --line:#dde1e8; --bg:#ffffff; --panel:#f6f7f9; --accent:#1f6fb4; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 38px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 8px; color: var(--muted); font-weight: 600; }
p { margin: 6px 0 12px; }
.sub { color: var(--muted); margin-bottom: 16px; }
.meta { display:grid; grid-template-columns: max-content 1fr; gap: 2px 18px; background:var(--panel);
  border:1px solid var(--line); border-radius:8px; padding:12px 16px; margin: 12px 0; }
.meta dt { color: var(--muted); } .meta dd { margin:0; }
.note { background:#fff8e6; border:1px solid #f0d999; border-radius:8px; padding:10px 14px; margin:12px 0; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--panel); font-weight: 600; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.txt, th.txt { text-align: left; }
tr.ref td { color: var(--muted); font-style: italic; }
tr.sep td { border-top: 2px solid var(--line); }
ul.pairs { margin: 4px 0 12px; padding-left: 22px; } ul.pairs li { margin: 2px 0; }
.n { color: var(--muted); font-size: 12px; margin-left: 6px; white-space: nowrap; }
.best { font-weight: 700; }
.na { color: var(--muted); font-style: italic; }
.grid2 { display:grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.panel { background: var(--panel); border:1px solid var(--line); border-radius: 8px; padding: 12px; min-width:0; }
.panel img { display:block; max-width:100%; height:auto; margin: 0 auto; }
.panel img.up { width: 100%; image-rendering: pixelated; }
.navail { display:flex; align-items:center; justify-content:center; min-height: 120px; color: var(--muted);
  font-style: italic; border: 1px dashed #c5cad3; border-radius: 6px; background: #fff; text-align:center;
  padding: 10px; }
.scroll { overflow-x: auto; }
details { border:1px solid var(--line); border-radius:8px; padding: 8px 14px; margin: 10px 0; background:#fff; }
details > summary { cursor: pointer; font-weight: 600; }
details pre { white-space: pre-wrap; word-break: break-all; }
table.prov { width: 100%; } table.prov td { font-size: 13px; }
table.prov td:last-child { text-align:left; word-break: break-all; }
.kv span.k { color: var(--muted); }
nav { margin: 10px 0 4px; font-size: 14px; }
nav a { color: var(--accent); text-decoration:none; margin-right: 14px; white-space: nowrap; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
@media (max-width: 800px) { .grid2 { grid-template-columns: 1fr; } }
"""


# ------------------------------------------------------------------------------------ sections

def _header(m: Mapping) -> str:
    """Title, run facts (commit, config hash, dataset), the note on FID and the navigation."""
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    ds = cfg.get("dataset", {}).get("name") if isinstance(cfg.get("dataset"), dict) else None
    commit = m.get("git_commit")
    dirty = m.get("git_dirty")
    commit_s = f"<code>{esc(commit)}</code>" if commit else '<span class="na">not a git checkout</span>'
    if dirty:
        commit_s += ' <span class="n">(uncommitted changes)</span>'
    rows = [("run", f"<code>{esc(m.get('run'))}</code>"), ("created", esc(m.get("created"))),
            ("git commit", commit_s), ("config hash", f"<code>{esc(m.get('config_hash'))}</code>")]
    if ds:
        rows.append(("dataset", f"<code>{esc(ds)}</code>"))
    fids = [f for f in m.get("figures", []) if f.get("metric") == "fid"]
    ns = sorted({f.get("n_samples") for f in fids if isinstance(f.get("n_samples"), int)})
    n_txt = ", ".join(f"N={n:,}" for n in ns) if ns else "N unknown"
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    has_sweep = bool((m.get("tables") or {}).get("sweep"))
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("headline", "Headline"), ("samples", "Samples"), ("training", "Training"), ("stability", "Stability"),
        ("probe", "Linear probe"), ("other", "Other figures"), ("sweep", "Sweep"), ("provenance", "Provenance"))
        if a != "sweep" or has_sweep)
    return (f'<header><h1>DiGIT report — run <code>{esc(m.get("run"))}</code></h1>'
            f'<div class="sub">Discriminative tokens (DiGIT) vs VQ tokens under the same stage-1 GPT; '
            f'every number below comes from <code>metrics.json</code> with its provenance.</div>'
            f'<dl class="meta">{meta}</dl>'
            f'<div class="note"><b>Note on FID.</b> FID is biased upward at small sample sizes and depends on N; '
            f'the number of generated images N is shown next to every FID (this run: {n_txt}). '
            f'Compare FIDs only at equal N; the paper reports N=50,000.</div>'
            f"<nav>{nav}</nav></header>\n")


ROW_ORDER = ("digit", "digit_nar", "vq", "maskgit", "mar", "mar_causal")
FAMILY_TEXT = {"gpt": "GPT (autoregressive)", "maskgit": "MaskGIT (mask-predict)",
               "mar": "MAR (masked, random order, diffusion head)",
               "mar_causal": "MAR causal (raster order, diffusion head)"}


def _models(figures: Sequence[Mapping], metrics: Iterable[str]) -> list[str]:
    """Models with any of ``metrics``: the generator rows in table order first, the rest in order of appearance."""
    wanted = set(metrics)
    seen = [f["model"] for f in figures if f.get("metric") in wanted]
    order = [m for m in ROW_ORDER if m in seen]
    return order + [m for m in dict.fromkeys(seen) if m not in order]


def _sampler_text(family: str | None, sampling: Mapping | None) -> str:
    text = FAMILY_TEXT.get(family or "gpt", str(family))
    if isinstance(sampling, Mapping) and sampling.get("iterations") is not None:
        text += f", {sampling['iterations']} iterations"
    if isinstance(sampling, Mapping) and sampling.get("num_iter") is not None and family == "mar":
        text += f", {sampling['num_iter']} steps"
    if isinstance(sampling, Mapping) and sampling.get("num_sampling_steps") is not None:
        text += f", {sampling['num_sampling_steps']} diffusion steps"
    return text


def _route(f: Mapping) -> list[str]:
    """Cells saying what a generation row is, from its FID figure's provenance: the tokens and
    generator, how its tokens become pixels, and the checkpoints (sha256 prefixes)."""
    p = f.get("provenance") or {}
    sampling = p.get("sampling") or {}
    latents = p.get("family") in ("mar", "mar_causal")
    tokens = "KL latents" if latents else ("DiGIT tokens" if p.get("stage2_checkpoint_sha256") else "VQ tokens")
    stage1 = f"{tokens}, {_sampler_text(p.get('family'), sampling.get('stage1'))}"
    if p.get("stage2_checkpoint_sha256"):
        kind = "NAR" if p.get("stage2_family") == "maskgit" else "AR"
        pixels = f"{kind} stage 2: {_sampler_text(p.get('stage2_family'), sampling.get('stage2'))} → VQGAN"
    else:
        pixels = "KL decoder" if latents else "VQGAN decoder"
    shas = [("stage 1", p.get("checkpoint_sha256")), ("stage 2", p.get("stage2_checkpoint_sha256"))]
    ck = " ".join(f'<code title="{esc(v)}">{name} {esc(str(v)[:10])}</code>' for name, v in shas if v)
    return [esc(stage1), esc(pixels), ck or '<span class="na">—</span>']


def _interval_text(f: Mapping, digits: int) -> str:
    """" [low, high]" of a figure with an interval, else ""."""
    lo, hi = f.get("low"), f.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        return ""
    return f" [{num(float(lo), digits)}, {num(float(hi), digits)}]"


def _kid_cell(f: Mapping, std: Mapping | None, digits: int) -> str:
    """KID x 10^3 ± its std over subsets; a dash with the reason when it is null."""
    v = f.get("value")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        reason = (f.get("provenance") or {}).get("kid_reason")
        return f'<span class="na" title="{esc(reason)}">—</span>' if reason else num(None)
    cell = num(v * KID_SCALE, digits)
    s = (std or {}).get("value")
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        cell += f" ± {num(s * KID_SCALE, digits)}"
    return cell


def _pair_sentence(p: Mapping) -> str:
    """One plain sentence on a pair of tables.separability."""
    a, b = esc(model_label(str(p.get("a")))), esc(model_label(str(p.get("b"))))
    na_, nb = p.get("n_a"), p.get("n_b")
    kid = {True: "KID ± 2 std disjoint", False: "KID ± 2 std overlap"}.get(p.get("kid_separable"), "")
    if p.get("fid_separable") is True:
        return f"{a} vs {b}: separable at {n_text(na_)} (FID intervals disjoint{'; ' + kid if kid else ''})."
    if p.get("fid_separable") is False:
        return f"{a} vs {b}: not separable at {n_text(na_)} (FID intervals overlap{'; ' + kid if kid else ''})."
    if na_ != nb:
        return (f"{a} vs {b}: FIDs do not compare ({n_text(na_)} vs {n_text(nb)}: FID's bias depends on N)"
                f"{'; ' + kid if kid else ''}.")
    return f"{a} vs {b}: {esc(p.get('reason') or 'no FID interval')}{'; ' + kid if kid else ''}."


def _separability(m: Mapping) -> str:
    """The sentences under the headline table: which differences are separable at this N."""
    sep = (m.get("tables") or {}).get("separability")
    if not isinstance(sep, Mapping) or not sep.get("pairs"):
        return ""
    pairs = [p for p in sep["pairs"] if isinstance(p, Mapping)]
    order = {True: 0, False: 1, None: 2}
    pairs.sort(key=lambda p: order.get(p.get("separable"), 2))   # separable first, then not, then not comparable
    items = "".join(f"<li>{_pair_sentence(p)}</li>" for p in pairs)
    fi = sep.get("fid_interval") or {}
    level = fi.get("level")
    level_txt = f"{level * 100:g}% " if isinstance(level, (int, float)) else ""
    return ('<h3 id="separability">Which differences are separable at this N</h3>'
            f'<p class="sub">Two rows are <b>separable at this N</b> when their {level_txt}FID intervals are disjoint; '
            'when they overlap the difference may be sampling noise: more images are needed to rank them. KID '
            '(unbiased at any N) is compared by mean ± 2 std over its subsets.</p>'
            f'<ul class="pairs">{items}</ul>')


def _headline(m: Mapping) -> str:
    """FID (with its interval) / KID / IS / precision / recall per model, each with its N, then
    which differences are separable."""
    figs = [f for f in m.get("figures", []) if isinstance(f, dict)]
    metrics = [h for h in HEADLINE if any(f.get("metric") == h[0] for f in figs) or h[0] not in OPTIONAL_HEADLINE]
    by = {(f.get("model"), f.get("metric")): f for f in figs}
    models = _models(figs, [h[0] for h in HEADLINE] + ["is_std"])
    if not models:
        return na("no FID / IS / precision / recall figures in metrics.json")
    head = ["model"] + [f"{t} {arrow}" for _, t, _, arrow in metrics] + ["generator", "pixels via", "checkpoints"]
    rows = []
    for model in models:
        row = [f"<b>{esc(model_label(model))}</b>"]
        route = _route(by[(model, "fid")]) if (model, "fid") in by else ['<span class="na">—</span>'] * 3
        for metric, _, digits, _ in metrics:
            f = by.get((model, metric))
            if f is None:
                row.append('<span class="na">—</span>')
                continue
            cell = _kid_cell(f, by.get((model, "kid_std")), digits) if metric == "kid" else num(f.get("value"), digits)
            if metric == "fid":
                cell += _interval_text(f, digits)
            if metric == "is_mean" and (model, "is_std") in by and by[(model, "is_std")].get("value") is not None:
                cell += f' ± {num(by[(model, "is_std")]["value"], digits)}'
            if metric == "fid" or f.get("n_samples") is not None:
                cell += n_badge(f.get("n_samples"))
            row.append(cell)
        rows.append(row + route)
    n_metrics = len(metrics)
    fid_prov = [(f.get("provenance") or {}).get("interval") for f in figs if f.get("metric") == "fid"]
    fid_prov = [p for p in fid_prov if isinstance(p, Mapping)]
    uncertainty = ""
    if fid_prov:
        p = fid_prov[0]
        level = p.get("level")
        level_txt = num(level * 100, 0) if isinstance(level, (int, float)) else "?"
        uncertainty = (f'FID [low, high]: {level_txt}% interval of the FID at this N by half-sampling '
                       f'({num(p.get("resamples"))} random halves of the generated images, the reference statistics '
                       'fixed); it shows the sampling spread, not the small-N bias. ')
    if any(f.get("metric") == "kid" for f in figs):
        uncertainty += ('KID ×10³ ± the standard deviation over its subsets (unbiased MMD², cubic polynomial '
                        'kernel; subsets of half the images at small N). ')
    return (html_table(head, rows, text_cols=(n_metrics + 1, n_metrics + 2, n_metrics + 3)) +
            f'<p class="sub">↓ lower is better, ↑ higher is better. {uncertainty}DiGIT samples are rendered to '
            'pixels through a stage 2 (AR: the GPT with the DiGIT grid as prefix; NAR: mask-predict, the paper\'s '
            '"DiGIT (+MaskGIT)") and the VQ decoder; the VQ baseline is the same stage-1 GPT trained on VQ tokens, '
            'MaskGIT the NAR model without a DiGIT context. Full provenance of every number: '
            '<a href="#provenance">Provenance</a>.</p>' + _separability(m))


def _samples(m: Mapping, workdir: Path) -> str:
    """The sample grids side by side (small PNGs upscaled), each titled with its FID."""
    grids = (m.get("artifacts") or {}).get("grids") or {}
    figs = {(f.get("model"), f.get("metric")): f for f in m.get("figures", []) if isinstance(f, dict)}
    panels = []
    for model in [m for m in ROW_ORDER if m in grids] + [k for k in grids if k not in ROW_ORDER]:
        rel = grids.get(model)
        title = esc(model_label(model))
        fid = figs.get((model, "fid"))
        if fid is not None:
            title += (f' <span class="n">FID {num(fid.get("value"), 2)}{_interval_text(fid, 1)}, '
                      f'{n_text(fid.get("n_samples"))}</span>')
        try:
            path = artifact_path(workdir, rel, f"artifacts.grids.{model}")
            data = path.read_bytes()
            mime = image_mime(path, data)
            small = mime == "image/png" and int.from_bytes(data[16:20], "big") < 540  # IHDR width
            body = img_tag(data, f"{model_label(model)} samples", mime, "up" if small else "") + \
                f'<div class="n mono" style="margin:6px 0 0">{esc(rel)}</div>'
        except (Missing, OSError, ValueError) as exc:
            body = na(str(exc))
        panels.append(f'<div class="panel"><h3>{title}</h3>{body}</div>')
    return f'<div class="grid2">{"".join(panels)}</div>'


def _other(m: Mapping) -> str:
    """Every figure the other sections do not show (PSNR, encoder accuracy, final losses)."""
    shown = {h[0] for h in HEADLINE} | {"is_std", "kid_std", "probe_top1"}
    figs = [f for f in m.get("figures", []) if isinstance(f, dict) and f.get("metric") not in shown]
    if not figs:
        return na("no other figures in metrics.json")
    rows = []
    for f in figs:
        metric = f.get("metric")
        v = f.get("value")
        digits = 2 if metric == "vq_psnr" else 4
        val = f"{v * 100:.2f}%" if metric == "encoder_accuracy" and isinstance(v, (int, float)) else num(v, digits)
        n = f.get("n_samples")
        rows.append([f"<code>{esc(f.get('id'))}</code>", esc(OTHER_METRIC_LABELS.get(metric, metric)),
                     esc(model_label(f.get("model", ""))), val, num(n, 0) if n is not None else num(None)])
    return html_table(["figure", "what", "model", "value", "N"], rows, text_cols=(1, 2))


def _sweep(m: Mapping) -> str:
    """The sampling sweep table; no section at all without one."""
    sweep = (m.get("tables") or {}).get("sweep")
    if not sweep:
        return ""
    cols = list(dict.fromkeys(k for r in sweep if isinstance(r, dict) for k in r))
    digits = {"fid": 2, "is_mean": 2, "is_std": 2, "fd_dinov2": 2}
    rows = [[num(r.get(c), digits.get(c, 3)) if not isinstance(r.get(c), (dict, list)) else
             f"<code>{esc(json.dumps(r.get(c), sort_keys=True))}</code>" for c in cols]
            for r in sweep if isinstance(r, dict)]
    body = html_table([esc(c) for c in cols], rows)
    if any(c == "fid" for c in cols):
        body += '<p class="sub">FID at the N of each row (see the N column where present); small-N FID is biased.</p>'
    return section("sweep", "Sampling sweep (top-k / top-p)", body)


def _provenance(m: Mapping) -> str:
    """Collapsed provenance of every figure and table, the artifacts and the configuration."""
    figs = [f for f in m.get("figures", []) if isinstance(f, dict)]
    rows = [[f"<code>{esc(f.get('id'))}</code>", num(f.get("value"), 4),
             num(f.get("n_samples"), 0) if f.get("n_samples") is not None else num(None),
             f'<div class="kv">{kv(f.get("provenance") or {})}</div>'] for f in figs]
    tables = m.get("tables") or {}
    extra = []
    st = tables.get("stability") or {}
    if st.get("provenance"):
        extra.append(["<code>tables.stability</code>", "", "", f'<div class="kv">{kv(st["provenance"])}</div>'])
    for model, p in (tables.get("probe") or {}).items():
        if isinstance(p, dict) and p.get("provenance"):
            extra.append([f"<code>tables.probe.{esc(model)}</code>", "", "",
                          f'<div class="kv">{kv(p["provenance"])}</div>'])
    body = html_table(["figure", "value", "N", "provenance"], rows + extra, cls="prov", text_cols=(3,))
    art = m.get("artifacts") or {}
    out = f"<details><summary>Figures ({len(figs)}) and tables</summary>{body}</details>"
    if art:
        out += f'<details><summary>Artifacts</summary><div class="kv">{kv(art)}</div></details>'
    if m.get("config") is not None:
        out += ("<details><summary>Configuration (validated; hash "
                f"<code>{esc(m.get('config_hash'))}</code>)</summary>"
                f"<pre class='mono'>{esc(json.dumps(m['config'], indent=2, sort_keys=True))}</pre></details>")
    return out


# ------------------------------------------------------------------------------------ entry points

def render_html(metrics: Mapping, *, workdir: str | Path = ".") -> str:
    """The whole report as one HTML string (self-contained)."""
    workdir = Path(workdir)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>DiGIT report: {esc(metrics.get('run'))}</title><style>{CSS}</style></head><body><main>",
        _header(metrics),
        section("headline", "Generation quality", guard(_headline, metrics)),
        section("samples", "Samples", guard(_samples, metrics, workdir)),
        section("training", "Training curves", guard(training_section, metrics, workdir)),
        section("stability", "Latent-space stability (paper Table 1)", guard(stability_section, metrics)),
        section("probe", "Linear probe", guard(probe_section, metrics)),
        section("other", "Other figures", guard(_other, metrics)),
        guard(_sweep, metrics),
        section("provenance", "Provenance", guard(_provenance, metrics)),
        f"<footer>Rendered by <code>pipeline.report</code> from <code>metrics.json</code> "
        f"(format <code>{esc(metrics.get('format'))}</code>).</footer>",
        "</main></body></html>\n",
    ]
    return "\n".join(parts)


def write_report(metrics_path: str | Path, out_html: str | Path, *, workdir: str | Path = ".") -> Path:
    """Render `metrics_path` (reports/{run}/metrics.json) to `out_html`, atomically. Artifact paths in
    metrics.json are resolved against `workdir` (the Snakemake working directory)."""
    import matplotlib
    matplotlib.use("Agg", force=False)  # no display; Figure objects below never touch pyplot
    metrics = read_json(metrics_path)
    write_bytes_atomic(out_html, render_html(metrics, workdir=workdir).encode("utf-8"))
    return Path(out_html)


def report_stage(config: dict, inputs: list[str], metrics_path: str | Path, out_html: str | Path) -> None:
    """The report stage: the artifacts named by ``NAME=PATH`` items -> metrics.json -> report.html."""
    named = {}
    for item in inputs:
        if "=" not in item:
            raise ConfigError(f"--input '{item}' must look like NAME=PATH")
        name, path = item.split("=", 1)
        named[name] = path
    metrics_stage(config, named, metrics_path)
    write_report(metrics_path, out_html)
    print(f"[report] {metrics_path}, {out_html}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    ap.add_argument("metrics", help="reports/{run}/metrics.json")
    ap.add_argument("out", help="report.html to write")
    ap.add_argument("--workdir", default=".", help="directory the artifact paths are relative to")
    a = ap.parse_args(argv)
    out = write_report(a.metrics, a.out, workdir=a.workdir)
    print(f"[report] {a.metrics} -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
