"""HTML pieces of report.html and the artifacts it reads: escaping, numbers, tables, panels.

Every helper returns an HTML string. An artifact that is absent or unreadable raises
:class:`Missing`, which :func:`guard` turns into a "not available" panel.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .io import read_json

LABELS = {"digit": "DiGIT", "digit_nar": "DiGIT + NAR stage 2", "vq": "VQ baseline",
          "maskgit": "MaskGIT (VQ tokens)", "mar": "MAR (KL latents)", "mar_causal": "MAR causal (KL latents)",
          "stage2": "Stage 2 (DiGIT → VQ)",
          "stage2_nar": "NAR stage 2 (DiGIT → VQ)", "tokenizer": "VQ tokenizer", "encoder": "Encoder"}
COLORS = {"digit": "#1f6fb4", "vq": "#d1495b", "stage2": "#2e9e5b", "digit_nar": "#6a3d9a", "maskgit": "#e08214",
          "stage2_nar": "#66a61e", "mar": "#17becf", "mar_causal": "#8c564b"}
FALLBACK_COLORS = ["#9467bd", "#7f7f7f", "#bcbd22", "#e377c2", "#393b79"]
NOT_AVAILABLE = "not available"


# ------------------------------------------------------------------------------------ text

def esc(x: Any) -> str:
    """Text made safe for HTML (quotes too)."""
    return html.escape(str(x), quote=True)


def model_label(model: str) -> str:
    return LABELS.get(model, model)


def model_color(model: str, i: int = 0) -> str:
    return COLORS.get(model, FALLBACK_COLORS[i % len(FALLBACK_COLORS)])


def num(v: Any, digits: int = 3) -> str:
    """A number with thousands separators (floats to ``digits``); a dash for None."""
    if v is None:
        return '<span class="na">—</span>'
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return esc(v)
    if isinstance(v, float) and not math.isfinite(v):
        return esc(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def n_text(n: Any) -> str:
    """The sample count as "N=1,000", or "N=?" when unknown."""
    return f"N={n:,}" if isinstance(n, int) and not isinstance(n, bool) else "N=?"


def n_badge(n: Any) -> str:
    return f'<span class="n">{n_text(n)}</span>'


def na(reason: str = "") -> str:
    """A "not available" panel, with the reason."""
    return f'<div class="navail">{NOT_AVAILABLE}{(": " + esc(reason)) if reason else ""}</div>'


def finite(xs: Iterable[Any]) -> list[float]:
    """The finite numbers among ``xs``, as floats (booleans are not numbers here)."""
    return [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def kv(d: Mapping) -> str:
    """A mapping as "key: value" lines (nested values as JSON)."""
    parts = []
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        parts.append(f'<div><span class="k">{esc(k)}:</span> <span class="mono">{esc(v)}</span></div>')
    return "".join(parts) or '<span class="na">—</span>'


def img_tag(data: bytes, alt: str, mime: str = "image/png", cls: str = "") -> str:
    """An <img> with the image embedded as base64."""
    b64 = base64.b64encode(data).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{esc(alt)}" src="data:{mime};base64,{b64}">'


def image_mime(path: Path, data: bytes) -> str:
    """The MIME type of PNG / JPEG / WebP bytes; ValueError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError(f"{path} is not a PNG/JPEG/WebP image")


# ------------------------------------------------------------------------------------ layout

def html_table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
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


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def guard(fn, *args) -> str:
    """A section that fails to render (malformed input) becomes a 'not available' panel."""
    try:
        return fn(*args)
    except Missing as exc:
        return na(str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad panel must not lose the whole report
        return na(f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------ artifacts

class Missing(Exception):
    """An artifact that is absent or unreadable; the message says which and why."""


def artifact_path(workdir: Path, rel: Any, key: str) -> Path:
    """The file ``rel`` (relative to ``workdir``) that metrics.json names under ``key``; Missing if
    metrics.json names none or the file does not exist."""
    path = Path(rel) if isinstance(rel, str) and rel else None
    if path is None:
        raise Missing(f"no {key} in metrics.json")
    path = path if path.is_absolute() else workdir / path
    if not path.is_file():
        raise Missing(f"{rel} does not exist")
    return path


def load_json(workdir: Path, rel: Any, key: str) -> Any:
    """The JSON artifact ``rel``; Missing when absent or unreadable."""
    path = artifact_path(workdir, rel, key)
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise Missing(f"{rel}: {exc}") from None


def _json_rows(text: str) -> list[dict]:
    """The dict rows of a JSON-lines text; a line cut by a crash is skipped, the rest kept."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_jsonl(workdir: Path, rel: Any, key: str) -> list[dict]:
    """The rows of the JSON-lines artifact ``rel``; Missing when absent, unreadable or empty."""
    path = artifact_path(workdir, rel, key)
    try:
        rows = _json_rows(path.read_text())
    except OSError as exc:
        raise Missing(f"{rel}: {exc}") from None
    if not rows:
        raise Missing(f"{rel} has no rows")
    return rows


def load_history(workdir: Path, rel: Any, key: str) -> list[dict]:
    """The per-epoch ``history`` list of a JSON artifact (vq.json, encoder.json)."""
    meta = load_json(workdir, rel, key)
    hist = meta.get("history") if isinstance(meta, dict) else None
    if not isinstance(hist, list) or not hist:
        raise Missing(f"{rel} has no history")
    return [h for h in hist if isinstance(h, dict)]
