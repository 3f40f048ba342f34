"""report.html: one self-contained HTML page rendered from reports/{run}/metrics.json.

Everything the page shows comes from metrics.json (schema: workflow/schemas/metrics.schema.yaml)
and from the artifacts it names under `artifacts` (paths relative to the working directory):

    artifacts.grids       {"digit": ".../samples/digit/grid.png", "vq": ".../samples/vq/grid.png"}
    artifacts.training    {"digit"|"vq"|"stage2": ".../checkpoints/<model>/metrics.jsonl"}
    artifacts.vq_history  .../vq/vq.json            (a "history" list of per-epoch dicts)
    artifacts.encoder     .../encoder/encoder.json  (a "history" list of per-epoch dicts)

Images are embedded as base64 PNG, plots are drawn with matplotlib (Agg, no pyplot state) and
embedded the same way; no external resources, no JavaScript. A missing or unreadable artifact
gives a "not available" panel, never an exception. The page depends only on its inputs (no clock,
PNG metadata stripped), so the same metrics.json renders to the same bytes.

    python -m pipeline.report reports/default/metrics.json reports/default/report.html
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .io import read_json, write_bytes_atomic
from .metrics.stability_table import PAPER_TABLE1, SNRS_DB, pivot

LABELS = {"digit": "DiGIT", "vq": "VQ baseline", "stage2": "Stage 2 (DiGIT → VQ)",
          "tokenizer": "VQ tokenizer", "encoder": "Encoder"}
STABILITY_LABELS = {"digit": "DiGIT (disc.)", "vq": "VQ"}
COLORS = {"digit": "#1f6fb4", "vq": "#d1495b", "stage2": "#2e9e5b"}
FALLBACK_COLORS = ["#8c564b", "#9467bd", "#7f7f7f", "#bcbd22", "#17becf"]

HEADLINE = [  # (metric, column title, digits, "lower/higher is better")
    ("fid", "FID", 2, "↓"),
    ("is_mean", "IS", 2, "↑"),
    ("precision", "Precision", 3, "↑"),
    ("recall", "Recall", 3, "↑"),
    ("fd_dinov2", "FD<sub>DINOv2</sub>", 2, "↓"),
]
OTHER_METRIC_LABELS = {"vq_psnr": "VQ reconstruction PSNR (dB)", "encoder_accuracy": "encoder test accuracy",
                       "final_loss": "final training loss", "probe_top1": "linear-probe top-1"}
NOT_AVAILABLE = "not available"

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


# ------------------------------------------------------------------------------------ helpers

def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _label(model: str) -> str:
    return LABELS.get(model, model)


def _color(model: str, i: int = 0) -> str:
    return COLORS.get(model, FALLBACK_COLORS[i % len(FALLBACK_COLORS)])


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return '<span class="na">—</span>'
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _esc(v)
    if isinstance(v, float) and not math.isfinite(v):
        return _esc(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def _n_text(n: Any) -> str:
    return f"N={n:,}" if isinstance(n, int) and not isinstance(n, bool) else "N=?"


def _n(n: Any) -> str:
    return f'<span class="n">{_n_text(n)}</span>'


def _na(reason: str = "") -> str:
    return f'<div class="navail">{NOT_AVAILABLE}{(": " + _esc(reason)) if reason else ""}</div>'


def _img_tag(data: bytes, alt: str, mime: str = "image/png", cls: str = "") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{_esc(alt)}" src="data:{mime};base64,{b64}">'


def _mime(path: Path, data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError(f"{path} is not a PNG/JPEG/WebP image")


def _resolve(workdir: Path, p: Any) -> Path | None:
    if not isinstance(p, str) or not p:
        return None
    path = Path(p)
    return path if path.is_absolute() else workdir / path


class _Missing(Exception):
    """An artifact that is absent or unreadable; the message says which and why."""


def _load_json(workdir: Path, rel: Any, key: str) -> Any:
    path = _resolve(workdir, rel)
    if path is None:
        raise _Missing(f"no {key} in metrics.json")
    if not path.is_file():
        raise _Missing(f"{rel} does not exist")
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise _Missing(f"{rel}: {exc}") from None


def _load_jsonl(workdir: Path, rel: Any, key: str) -> list[dict]:
    path = _resolve(workdir, rel)
    if path is None:
        raise _Missing(f"no {key} in metrics.json")
    if not path.is_file():
        raise _Missing(f"{rel} does not exist")
    rows = []
    try:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a crash: skip it, keep the rest
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError as exc:
        raise _Missing(f"{rel}: {exc}") from None
    if not rows:
        raise _Missing(f"{rel} has no rows")
    return rows


def _history(workdir: Path, rel: Any, key: str) -> list[dict]:
    meta = _load_json(workdir, rel, key)
    hist = meta.get("history") if isinstance(meta, dict) else None
    if not isinstance(hist, list) or not hist:
        raise _Missing(f"{rel} has no history")
    return [h for h in hist if isinstance(h, dict)]


def _figure(w: float, h: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e3e6eb", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return buf.getvalue()


def _legend_above(fig, handles, labels) -> None:
    """One legend above the axes, never over the data (twin axes share it)."""
    fig.legend(handles, labels, loc="outside upper center", ncols=min(4, len(labels)), frameon=False, fontsize=8)


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _plot_img(fig, alt: str) -> str:
    return _img_tag(_png(fig), alt)


def _finite(xs: Iterable[Any]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
           row_cls: Sequence[str] | None = None, text_cols: Sequence[int] = ()) -> str:
    """An HTML table; cells are HTML already. Numbers right-aligned, `text_cols` left-aligned."""
    out = [f'<div class="scroll"><table{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}><thead><tr>']
    out += [f'<th class="txt">{h}</th>' if j in text_cols else f"<th>{h}</th>" for j, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        rc = row_cls[i] if row_cls and row_cls[i] else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        out += [f'<td class="txt">{c}</td>' if j in text_cols else f"<td>{c}</td>" for j, c in enumerate(r[:-1])]
        span = len(head) - len(r) + 1  # a short row: its last cell spans the rest (a "not available" note)
        out.append(f'<td class="txt" colspan="{span}">{r[-1]}</td>' if span > 1 else
                   f'<td class="txt">{r[-1]}</td>' if len(r) - 1 in text_cols else f"<td>{r[-1]}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>\n{body}\n</section>\n'


def _guard(fn, *args) -> str:
    """A section that fails to render (malformed input) becomes a 'not available' panel."""
    try:
        return fn(*args)
    except _Missing as exc:
        return _na(str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad panel must not lose the whole report
        return _na(f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------ sections

def _header(m: Mapping) -> str:
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    ds = cfg.get("dataset", {}).get("name") if isinstance(cfg.get("dataset"), dict) else None
    commit = m.get("git_commit")
    dirty = m.get("git_dirty")
    commit_s = f"<code>{_esc(commit)}</code>" if commit else '<span class="na">not a git checkout</span>'
    if dirty:
        commit_s += ' <span class="n">(uncommitted changes)</span>'
    rows = [("run", f"<code>{_esc(m.get('run'))}</code>"), ("created", _esc(m.get("created"))),
            ("git commit", commit_s), ("config hash", f"<code>{_esc(m.get('config_hash'))}</code>")]
    if ds:
        rows.append(("dataset", f"<code>{_esc(ds)}</code>"))
    fids = [f for f in m.get("figures", []) if f.get("metric") == "fid"]
    ns = sorted({f.get("n_samples") for f in fids if isinstance(f.get("n_samples"), int)})
    n_txt = ", ".join(f"N={n:,}" for n in ns) if ns else "N unknown"
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    has_sweep = bool((m.get("tables") or {}).get("sweep"))
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("headline", "Headline"), ("samples", "Samples"), ("training", "Training"), ("stability", "Stability"),
        ("probe", "Linear probe"), ("other", "Other figures"), ("sweep", "Sweep"), ("provenance", "Provenance"))
        if a != "sweep" or has_sweep)
    return (f'<header><h1>DiGIT report — run <code>{_esc(m.get("run"))}</code></h1>'
            f'<div class="sub">Discriminative tokens (DiGIT) vs VQ tokens under the same stage-1 GPT; '
            f'every number below comes from <code>metrics.json</code> with its provenance.</div>'
            f'<dl class="meta">{meta}</dl>'
            f'<div class="note"><b>Note on FID.</b> FID is biased upward at small sample sizes and depends on N; '
            f'the number of generated images N is shown next to every FID (this run: {n_txt}). '
            f'Compare FIDs only at equal N; the paper reports N=50,000.</div>'
            f"<nav>{nav}</nav></header>\n")


def _models(figures: Sequence[Mapping], metrics: Iterable[str]) -> list[str]:
    wanted = set(metrics)
    seen = [f["model"] for f in figures if f.get("metric") in wanted]
    order = [m for m in ("digit", "vq") if m in seen]
    return order + [m for m in dict.fromkeys(seen) if m not in order]


def _headline(m: Mapping) -> str:
    figs = [f for f in m.get("figures", []) if isinstance(f, dict)]
    metrics = [h for h in HEADLINE if any(f.get("metric") == h[0] for f in figs) or h[0] != "fd_dinov2"]
    by = {(f.get("model"), f.get("metric")): f for f in figs}
    models = _models(figs, [h[0] for h in HEADLINE] + ["is_std"])
    if not models:
        return _na("no FID / IS / precision / recall figures in metrics.json")
    head = ["model"] + [f"{t} {arrow}" for _, t, _, arrow in metrics]
    rows = []
    for model in models:
        row = [f"<b>{_esc(_label(model))}</b>"]
        for metric, _, digits, _ in metrics:
            f = by.get((model, metric))
            if f is None:
                row.append('<span class="na">—</span>')
                continue
            cell = _num(f.get("value"), digits)
            if metric == "is_mean" and (model, "is_std") in by and by[(model, "is_std")].get("value") is not None:
                cell += f' ± {_num(by[(model, "is_std")]["value"], digits)}'
            if metric == "fid" or f.get("n_samples") is not None:
                cell += _n(f.get("n_samples"))
            row.append(cell)
        rows.append(row)
    return (_table(head, rows) +
            '<p class="sub">↓ lower is better, ↑ higher is better. DiGIT samples are rendered to pixels through '
            'stage 2 and the VQ decoder; the VQ baseline is the same stage-1 GPT trained on VQ tokens directly.</p>')


def _samples(m: Mapping, workdir: Path) -> str:
    grids = (m.get("artifacts") or {}).get("grids") or {}
    figs = {(f.get("model"), f.get("metric")): f for f in m.get("figures", []) if isinstance(f, dict)}
    panels = []
    for model in ["digit", "vq"] + [k for k in grids if k not in ("digit", "vq")]:
        rel = grids.get(model)
        title = _esc(_label(model))
        fid = figs.get((model, "fid"))
        if fid is not None:
            title += f' <span class="n">FID {_num(fid.get("value"), 2)}, {_n_text(fid.get("n_samples"))}</span>'
        try:
            path = _resolve(workdir, rel)
            if path is None:
                raise _Missing(f"no artifacts.grids.{model} in metrics.json")
            if not path.is_file():
                raise _Missing(f"{rel} does not exist")
            data = path.read_bytes()
            mime = _mime(path, data)
            small = mime == "image/png" and int.from_bytes(data[16:20], "big") < 540  # IHDR width
            body = _img_tag(data, f"{_label(model)} samples", mime, "up" if small else "") + \
                f'<div class="n mono" style="margin:6px 0 0">{_esc(rel)}</div>'
        except (_Missing, OSError, ValueError) as exc:
            body = _na(str(exc))
        panels.append(f'<div class="panel"><h3>{title}</h3>{body}</div>')
    return f'<div class="grid2">{"".join(panels)}</div>'


def _training(m: Mapping, workdir: Path) -> str:
    training = (m.get("artifacts") or {}).get("training") or {}
    models = ["digit", "vq", "stage2"] + [k for k in training if k not in ("digit", "vq", "stage2")]
    curves, rows = {}, []
    for model in models:
        try:
            data = _load_jsonl(workdir, training.get(model), f"artifacts.training.{model}")
            pts = [(r["step"], r["loss"]) for r in data
                   if isinstance(r.get("step"), (int, float)) and _finite([r.get("loss")])]
            if not pts:
                raise _Missing(f"{training.get(model)}: no (step, loss) rows")
            curves[model] = pts
            last = data[-1]
            tps = sorted(_finite(r.get("tokens_per_s") for r in data))
            mfu = _finite(r.get("mfu") for r in data)
            rows.append([f"<b>{_esc(_label(model))}</b>", _num(last.get("step"), 0),
                         _num(last.get("epoch"), 2), _num(last.get("loss"), 4), _num(min(p[1] for p in pts), 4),
                         _num(tps[len(tps) // 2], 0) if tps else _num(None), _num(last.get("grad_norm"), 3),
                         (f"{mfu[-1] * 100:.1f}%" if mfu else _num(None)),
                         _num(last.get("elapsed") / 60, 1) if _finite([last.get("elapsed")]) else _num(None)])
        except _Missing as exc:
            rows.append([f"<b>{_esc(_label(model))}</b>",
                         f'<span class="na">{NOT_AVAILABLE}: {_esc(exc)}</span>'])
    if curves:
        fig, (ax,) = _figure(9.8, 3.4)
        for i, (model, pts) in enumerate(curves.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=_label(model), color=_color(model, i), lw=1.6)
        losses = _finite(p[1] for pts in curves.values() for p in pts)
        if min(losses) > 0 and max(losses) / min(losses) > 5:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.legend(frameon=False)
        plot = f'<div class="panel plot">{_plot_img(fig, "training loss vs step")}</div>'
    else:
        plot = _na("no training metrics")
    head = ["model", "steps", "epochs", "last loss", "min loss", "tokens/s (median)", "grad norm", "MFU",
            "minutes"]
    return plot + _table(head, rows) + _tokenizer_training(m, workdir)


def _tokenizer_training(m: Mapping, workdir: Path) -> str:
    art = m.get("artifacts") or {}
    panels = []
    # VQ tokenizer: reconstruction loss and test PSNR per epoch
    try:
        hist = _history(workdir, art.get("vq_history"), "artifacts.vq_history")
        ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        fig, (ax,) = _figure(4.8, 3.1)
        ax.plot(ep, [h.get("rec_loss") for h in hist], "o-", color="#1f6fb4", lw=1.6, ms=3, label="rec loss")
        if any("vq_loss" in h for h in hist):
            ax.plot(ep, [h.get("vq_loss") for h in hist], "s--", color="#6b9bd1", lw=1.2, ms=3, label="VQ loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        psnr_key = next((k for k in ("test_psnr_first_1000", "test_psnr") if any(k in h for h in hist)), None)
        handles, labels = ax.get_legend_handles_labels()
        if psnr_key:
            h2, l2 = _second_axis(ax, ep, [h.get(psnr_key) for h in hist], "^-", "#d1495b", 1.6, "test PSNR",
                                  "test PSNR (dB)", label_color="#d1495b")
            handles, labels = handles + h2, labels + l2
        _legend_above(fig, handles, labels)
        body = _plot_img(fig, "VQ tokenizer training")
    except _Missing as exc:
        body = _na(str(exc))
    panels.append(f'<div class="panel plot"><h3>VQ tokenizer training</h3>{body}</div>')
    # encoder (tiny demo): test accuracy and train loss per epoch
    try:
        hist = _history(workdir, art.get("encoder"), "artifacts.encoder")
        ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        fig, (ax,) = _figure(4.8, 3.1)
        ax.plot(ep, [h.get("test_accuracy") for h in hist], "o-", color="#2e9e5b", lw=1.6, ms=3,
                label="test accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy", color="#2e9e5b")
        handles, labels = ax.get_legend_handles_labels()
        if any("train_loss" in h for h in hist):
            h2, l2 = _second_axis(ax, ep, [h.get("train_loss") for h in hist], "s--", "#7f7f7f", 1.2, "train loss",
                                  "train loss")
            handles, labels = handles + h2, labels + l2
        _legend_above(fig, handles, labels)
        body = _plot_img(fig, "encoder training")
    except _Missing as exc:
        body = _na(str(exc))
    panels.append(f'<div class="panel plot"><h3>Encoder training</h3>{body}</div>')
    return f'<div class="grid2">{"".join(panels)}</div>'


def _second_axis(ax, x, ys, style: str, color: str, lw: float, label: str, ylabel: str, label_color=None):
    """Plot ``ys`` on a right-hand y axis; returns its legend handles and labels."""
    ax2 = ax.twinx()
    ax2.spines["top"].set_visible(False)
    ax2.plot(x, ys, style, color=color, lw=lw, ms=3, label=label)
    if label_color:
        ax2.set_ylabel(ylabel, color=label_color)
    else:
        ax2.set_ylabel(ylabel)
    return ax2.get_legend_handles_labels()


def _paper_table1() -> tuple[list[float], dict]:
    return [float(x) for x in SNRS_DB], PAPER_TABLE1


def _snr(s: float) -> str:
    return f"{s:g}"


def _stability(m: Mapping) -> str:
    st = (m.get("tables") or {}).get("stability") or {}
    rows = st.get("rows") or []
    if not rows:
        return _na("no stability rows in metrics.json")
    snrs, names, cells = pivot(rows, st.get("snrs") or [])
    names = [n for n in ("digit", "vq") if n in names] + [n for n in names if n not in ("digit", "vq")]
    paper = _paper_table1()
    if paper is not None and [round(s, 6) for s in paper[0]] != [round(s, 6) for s in snrs]:
        paper = None  # columns differ from the paper's: no reference rows
    head = ["SNR (dB)"] + [_snr(s) for s in snrs]
    body, cls = [], []
    for metric, what, better in (("change_rate", "token change rate", "lower: more stable"),
                                 ("cosine", "token cosine similarity", "higher: more stable")):
        first = True
        for name in names:
            body.append([f"{_esc(STABILITY_LABELS.get(name, name))} {what} <span class='n'>({better})</span>"] +
                        [_num(cells[(name, s)][metric], 3) if (name, s) in cells else _num(None) for s in snrs])
            cls.append("sep" if first and metric == "cosine" else "")
            first = False
        if paper is not None:
            for name in names:
                if name in paper[1] and metric in paper[1][name]:
                    body.append([f"paper Table 1: {_esc(STABILITY_LABELS.get(name, name))} {what}"] +
                                [f"{v:.3f}" for v in paper[1][name][metric]])
                    cls.append("ref")
    n_img = next((r.get("images") for r in rows if isinstance(r.get("images"), int)), None)
    caption = ('<p class="sub">Gaussian noise at each SNR is added to the clean image; a token "changes" when its '
               "index differs from the clean image's; cosine compares the embeddings (centroid / codebook row) "
               "of the clean and noisy tokens."
               + (f" Computed on {n_img:,} images." if n_img else "")
               + (" Italic rows: the paper's ImageNet numbers, for reference." if paper else "") + "</p>")
    fig, axes = _figure(9.8, 3.3, ncols=2)
    x = list(range(len(snrs)))
    for i, name in enumerate(names):
        for ax, metric in zip(axes, ("change_rate", "cosine")):
            ys = [cells[(name, s)][metric] if (name, s) in cells else float("nan") for s in snrs]
            ax.plot(x, ys, "o-", color=_color(name, i), lw=1.8, ms=4, label=STABILITY_LABELS.get(name, name))
            if paper is not None and name in paper[1]:
                ax.plot(x, paper[1][name][metric], ":", color=_color(name, i), lw=1.2, alpha=0.8,
                        label=f"paper {STABILITY_LABELS.get(name, name)}")
    for ax, t in zip(axes, ("token change rate ↓", "token cosine similarity ↑")):
        ax.set_xticks(x, [_snr(s) for s in snrs])
        ax.set_xlabel("SNR (dB)")
        ax.set_title(t, fontsize=10)
    _legend_above(fig, *axes[0].get_legend_handles_labels())
    return (_table(head, body, row_cls=cls) + caption +
            f'<div class="panel plot">{_plot_img(fig, "stability vs SNR")}</div>')


def _probe_acc(layer: Mapping) -> float | None:
    for k in ("top1", "test_top1", "test_acc", "accuracy", "acc"):
        v = layer.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _probe(m: Mapping) -> str:
    probe = (m.get("tables") or {}).get("probe") or {}
    if not probe:
        return _na("no linear-probe results in metrics.json")
    models = [k for k in ("digit", "vq") if k in probe] + [k for k in probe if k not in ("digit", "vq")]
    acc: dict[str, dict[int, float | None]] = {}
    for model in models:
        layers = probe[model].get("layers") or []
        acc[model] = {int(l.get("layer", i)): _probe_acc(l) for i, l in enumerate(layers) if isinstance(l, dict)}
    all_layers = sorted({l for a in acc.values() for l in a})
    head = ["layer"] + [f"{_esc(_label(k))} top-1" for k in models]
    body = []
    for l in all_layers:
        row = [str(l)]
        for model in models:
            v = acc[model].get(l)
            best = probe[model].get("best_layer") == l
            cell = f"{v * 100:.1f}%" if v is not None else _num(None)
            row.append(f'<span class="best">{cell}</span>' if best and v is not None else cell)
        body.append(row)
    body.append(["<b>best (layer)</b>"] + [
        f'<b>{probe[k]["best_top1"] * 100:.1f}%</b> <span class="n">(layer {probe[k]["best_layer"]})</span>'
        if isinstance(probe[k].get("best_top1"), (int, float)) else _num(None) for k in models])
    cls = [""] * (len(body) - 1) + ["sep"]
    fig, (ax,) = _figure(4.8, 3.1)
    for i, model in enumerate(models):
        pts = [(l, v * 100) for l, v in sorted(acc[model].items()) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=_color(model, i), lw=1.8, ms=4,
                    label=_label(model))
    ax.set_xlabel("layer (0-based block output)")
    ax.set_ylabel("linear-probe top-1 (%)")
    if all_layers:
        ax.set_xticks(all_layers)
    _legend_above(fig, *ax.get_legend_handles_labels())
    return ('<div class="grid2"><div>' + _table(head, body, row_cls=cls) +
            '<p class="sub">Frozen stage-1 GPT, mean-pooled hidden states of each block, one linear classifier per '
            'layer; bold: best layer.</p></div>'
            f'<div class="panel plot">{_plot_img(fig, "linear probe accuracy vs layer")}</div></div>')


def _other(m: Mapping) -> str:
    shown = {h[0] for h in HEADLINE} | {"is_std", "probe_top1"}
    figs = [f for f in m.get("figures", []) if isinstance(f, dict) and f.get("metric") not in shown]
    if not figs:
        return _na("no other figures in metrics.json")
    rows = []
    for f in figs:
        metric = f.get("metric")
        v = f.get("value")
        digits = 2 if metric == "vq_psnr" else 4
        val = f"{v * 100:.2f}%" if metric == "encoder_accuracy" and isinstance(v, (int, float)) else _num(v, digits)
        n = f.get("n_samples")
        rows.append([f"<code>{_esc(f.get('id'))}</code>", _esc(OTHER_METRIC_LABELS.get(metric, metric)),
                     _esc(_label(f.get("model", ""))), val, _num(n, 0) if n is not None else _num(None)])
    return _table(["figure", "what", "model", "value", "N"], rows, text_cols=(1, 2))


def _sweep(m: Mapping) -> str:
    sweep = (m.get("tables") or {}).get("sweep")
    if not sweep:
        return ""
    cols = list(dict.fromkeys(k for r in sweep if isinstance(r, dict) for k in r))
    digits = {"fid": 2, "is_mean": 2, "is_std": 2, "fd_dinov2": 2}
    rows = [[_num(r.get(c), digits.get(c, 3)) if not isinstance(r.get(c), (dict, list)) else
             f"<code>{_esc(json.dumps(r.get(c), sort_keys=True))}</code>" for c in cols]
            for r in sweep if isinstance(r, dict)]
    body = _table([_esc(c) for c in cols], rows)
    if any(c == "fid" for c in cols):
        body += '<p class="sub">FID at the N of each row (see the N column where present); small-N FID is biased.</p>'
    return _section("sweep", "Sampling sweep (top-k / top-p)", body)


def _kv(d: Mapping) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        parts.append(f'<div><span class="k">{_esc(k)}:</span> <span class="mono">{_esc(v)}</span></div>')
    return "".join(parts) or '<span class="na">—</span>'


def _provenance(m: Mapping) -> str:
    figs = [f for f in m.get("figures", []) if isinstance(f, dict)]
    rows = [[f"<code>{_esc(f.get('id'))}</code>", _num(f.get("value"), 4),
             _num(f.get("n_samples"), 0) if f.get("n_samples") is not None else _num(None),
             f'<div class="kv">{_kv(f.get("provenance") or {})}</div>'] for f in figs]
    tables = m.get("tables") or {}
    extra = []
    st = tables.get("stability") or {}
    if st.get("provenance"):
        extra.append(["<code>tables.stability</code>", "", "", f'<div class="kv">{_kv(st["provenance"])}</div>'])
    for model, p in (tables.get("probe") or {}).items():
        if isinstance(p, dict) and p.get("provenance"):
            extra.append([f"<code>tables.probe.{_esc(model)}</code>", "", "",
                          f'<div class="kv">{_kv(p["provenance"])}</div>'])
    body = _table(["figure", "value", "N", "provenance"], rows + extra, cls="prov", text_cols=(3,))
    art = m.get("artifacts") or {}
    out = f"<details><summary>Figures ({len(figs)}) and tables</summary>{body}</details>"
    if art:
        out += f'<details><summary>Artifacts</summary><div class="kv">{_kv(art)}</div></details>'
    if m.get("config") is not None:
        out += ("<details><summary>Configuration (validated; hash "
                f"<code>{_esc(m.get('config_hash'))}</code>)</summary>"
                f"<pre class='mono'>{_esc(json.dumps(m['config'], indent=2, sort_keys=True))}</pre></details>")
    return out


# ------------------------------------------------------------------------------------ entry points

def render_html(metrics: Mapping, *, workdir: str | Path = ".") -> str:
    """The whole report as one HTML string (self-contained)."""
    workdir = Path(workdir)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>DiGIT report: {_esc(metrics.get('run'))}</title><style>{CSS}</style></head><body><main>",
        _header(metrics),
        _section("headline", "Generation quality", _guard(_headline, metrics)),
        _section("samples", "Samples", _guard(_samples, metrics, workdir)),
        _section("training", "Training curves", _guard(_training, metrics, workdir)),
        _section("stability", "Latent-space stability (paper Table 1)", _guard(_stability, metrics)),
        _section("probe", "Linear probe", _guard(_probe, metrics)),
        _section("other", "Other figures", _guard(_other, metrics)),
        _guard(_sweep, metrics),
        _section("provenance", "Provenance", _guard(_provenance, metrics)),
        f"<footer>Rendered by <code>pipeline.report</code> from <code>metrics.json</code> "
        f"(format <code>{_esc(metrics.get('format'))}</code>).</footer>",
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
