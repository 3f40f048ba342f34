"""The plotted sections of report.html: training curves, token stability and the linear probe.

Plots are drawn with matplotlib Figure objects (Agg, no pyplot state) and embedded as PNG without
metadata, so the same inputs give the same bytes.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

from .metrics.stability_table import PAPER_TABLE1, SNRS_DB, pivot
from .report_html import (NOT_AVAILABLE, Missing, esc, finite, html_table, img_tag, load_history, load_jsonl,
                          model_color, model_label, na, num)

STABILITY_LABELS = {"digit": "DiGIT (disc.)", "vq": "VQ"}


# ------------------------------------------------------------------------------------ figures

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
    return img_tag(_png(fig), alt)


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


def _legend_with_right_axis(fig, ax, x, ys, style: str, color: str, lw: float, label: str, ylabel: str,
                            label_color=None) -> None:
    """Plot ``ys`` (unless None) on a right-hand axis, then one legend above for both axes."""
    handles, labels = ax.get_legend_handles_labels()
    if ys is not None:
        h2, l2 = _second_axis(ax, x, ys, style, color, lw, label, ylabel, label_color=label_color)
        handles, labels = handles + h2, labels + l2
    _legend_above(fig, handles, labels)


# ------------------------------------------------------------------------------------ training

TRAINING_HEAD = ["model", "steps", "epochs", "last loss", "min loss", "tokens/s (median)", "grad norm", "MFU",
                 "minutes"]


def _loss_curve(data: list[dict], rel) -> list[tuple]:
    """(step, loss) points of a training log; Missing when it has none."""
    pts = [(r["step"], r["loss"]) for r in data
           if isinstance(r.get("step"), (int, float)) and finite([r.get("loss")])]
    if not pts:
        raise Missing(f"{rel}: no (step, loss) rows")
    return pts


def _training_row(model: str, data: list[dict], pts: list[tuple]) -> list[str]:
    """Steps, epochs, last/min loss, median tokens/s, grad norm, MFU and minutes of one model."""
    last = data[-1]
    tps = sorted(finite(r.get("tokens_per_s") for r in data))
    mfu = finite(r.get("mfu") for r in data)
    return [f"<b>{esc(model_label(model))}</b>", num(last.get("step"), 0),
            num(last.get("epoch"), 2), num(last.get("loss"), 4), num(min(p[1] for p in pts), 4),
            num(tps[len(tps) // 2], 0) if tps else num(None), num(last.get("grad_norm"), 3),
            (f"{mfu[-1] * 100:.1f}%" if mfu else num(None)),
            num(last.get("elapsed") / 60, 1) if finite([last.get("elapsed")]) else num(None)]


def _loss_plot(curves: dict) -> str:
    """All loss curves in one panel (log scale when they span more than 5x)."""
    if not curves:
        return na("no training metrics")
    fig, (ax,) = _figure(9.8, 3.4)
    for i, (model, pts) in enumerate(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=model_label(model), color=model_color(model, i),
                lw=1.6)
    losses = finite(p[1] for pts in curves.values() for p in pts)
    if min(losses) > 0 and max(losses) / min(losses) > 5:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.legend(frameon=False)
    return f'<div class="panel plot">{_plot_img(fig, "training loss vs step")}</div>'


def training_section(m: Mapping, workdir: Path) -> str:
    """Loss curves and a summary row per model, then the tokenizer panels."""
    training = (m.get("artifacts") or {}).get("training") or {}
    models = ["digit", "vq", "stage2"] + [k for k in training if k not in ("digit", "vq", "stage2")]
    curves, rows = {}, []
    for model in models:
        try:
            data = load_jsonl(workdir, training.get(model), f"artifacts.training.{model}")
            curves[model] = _loss_curve(data, training.get(model))
            rows.append(_training_row(model, data, curves[model]))
        except Missing as exc:
            rows.append([f"<b>{esc(model_label(model))}</b>",
                         f'<span class="na">{NOT_AVAILABLE}: {esc(exc)}</span>'])
    return _loss_plot(curves) + html_table(TRAINING_HEAD, rows) + _tokenizer_training(m, workdir)


def _history_panel(title: str, alt: str, workdir: Path, rel, key: str, draw) -> str:
    """A panel with ``draw(history, epochs)``'s figure of a per-epoch history, or "not available"."""
    try:
        hist = load_history(workdir, rel, key)
        body = _plot_img(draw(hist, [h.get("epoch", i + 1) for i, h in enumerate(hist)]), alt)
    except Missing as exc:
        body = na(str(exc))
    return f'<div class="panel plot"><h3>{title}</h3>{body}</div>'


def _vq_history_figure(hist: list[dict], ep: list):
    """VQ tokenizer: reconstruction (and VQ) loss, test PSNR on the right axis."""
    fig, (ax,) = _figure(4.8, 3.1)
    ax.plot(ep, [h.get("rec_loss") for h in hist], "o-", color="#1f6fb4", lw=1.6, ms=3, label="rec loss")
    if any("vq_loss" in h for h in hist):
        ax.plot(ep, [h.get("vq_loss") for h in hist], "s--", color="#6b9bd1", lw=1.2, ms=3, label="VQ loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    psnr_key = next((k for k in ("test_psnr_first_1000", "test_psnr") if any(k in h for h in hist)), None)
    psnr = [h.get(psnr_key) for h in hist] if psnr_key else None
    _legend_with_right_axis(fig, ax, ep, psnr, "^-", "#d1495b", 1.6, "test PSNR", "test PSNR (dB)",
                            label_color="#d1495b")
    return fig


def _encoder_history_figure(hist: list[dict], ep: list):
    """Tiny demo encoder: test accuracy, train loss on the right axis."""
    fig, (ax,) = _figure(4.8, 3.1)
    ax.plot(ep, [h.get("test_accuracy") for h in hist], "o-", color="#2e9e5b", lw=1.6, ms=3,
            label="test accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy", color="#2e9e5b")
    loss = [h.get("train_loss") for h in hist] if any("train_loss" in h for h in hist) else None
    _legend_with_right_axis(fig, ax, ep, loss, "s--", "#7f7f7f", 1.2, "train loss", "train loss")
    return fig


def _tokenizer_training(m: Mapping, workdir: Path) -> str:
    art = m.get("artifacts") or {}
    panels = [_history_panel("VQ tokenizer training", "VQ tokenizer training", workdir, art.get("vq_history"),
                             "artifacts.vq_history", _vq_history_figure),
              _history_panel("Encoder training", "encoder training", workdir, art.get("encoder"),
                             "artifacts.encoder", _encoder_history_figure)]
    return f'<div class="grid2">{"".join(panels)}</div>'


# ------------------------------------------------------------------------------------ stability

STABILITY_METRICS = (("change_rate", "token change rate", "lower: more stable"),
                     ("cosine", "token cosine similarity", "higher: more stable"))


def _snr(s: float) -> str:
    return f"{s:g}"


def _paper_rows(snrs: list[float]) -> dict | None:
    """The paper's Table 1 (tokenizer -> metric -> values) when its SNR columns are ours, else None."""
    if [round(float(s), 6) for s in SNRS_DB] != [round(s, 6) for s in snrs]:
        return None  # columns differ from the paper's: no reference rows
    return PAPER_TABLE1


def _stability_table(names: list[str], snrs: list[float], cells: dict, paper: dict | None) -> str:
    """One row per (metric, tokenizer), the paper's rows after each metric's own."""
    body, cls = [], []
    for metric, what, better in STABILITY_METRICS:
        for k, name in enumerate(names):
            body.append([f"{esc(STABILITY_LABELS.get(name, name))} {what} <span class='n'>({better})</span>"] +
                        [num(cells[(name, s)][metric], 3) if (name, s) in cells else num(None) for s in snrs])
            cls.append("sep" if k == 0 and metric == "cosine" else "")
        for name in names if paper is not None else []:
            if name in paper and metric in paper[name]:
                body.append([f"paper Table 1: {esc(STABILITY_LABELS.get(name, name))} {what}"] +
                            [f"{v:.3f}" for v in paper[name][metric]])
                cls.append("ref")
    return html_table(["SNR (dB)"] + [_snr(s) for s in snrs], body, row_cls=cls)


def _stability_caption(rows: list[dict], paper: dict | None) -> str:
    n_img = next((r.get("images") for r in rows if isinstance(r.get("images"), int)), None)
    return ('<p class="sub">Gaussian noise at each SNR is added to the clean image; a token "changes" when its '
            "index differs from the clean image's; cosine compares the embeddings (centroid / codebook row) "
            "of the clean and noisy tokens."
            + (f" Computed on {n_img:,} images." if n_img else "")
            + (" Italic rows: the paper's ImageNet numbers, for reference." if paper else "") + "</p>")


def _stability_plot(names: list[str], snrs: list[float], cells: dict, paper: dict | None) -> str:
    """Change rate and cosine against SNR, side by side; the paper's curves dotted."""
    fig, axes = _figure(9.8, 3.3, ncols=2)
    x = list(range(len(snrs)))
    for i, name in enumerate(names):
        for ax, metric in zip(axes, ("change_rate", "cosine")):
            ys = [cells[(name, s)][metric] if (name, s) in cells else float("nan") for s in snrs]
            ax.plot(x, ys, "o-", color=model_color(name, i), lw=1.8, ms=4, label=STABILITY_LABELS.get(name, name))
            if paper is not None and name in paper:
                ax.plot(x, paper[name][metric], ":", color=model_color(name, i), lw=1.2, alpha=0.8,
                        label=f"paper {STABILITY_LABELS.get(name, name)}")
    for ax, t in zip(axes, ("token change rate ↓", "token cosine similarity ↑")):
        ax.set_xticks(x, [_snr(s) for s in snrs])
        ax.set_xlabel("SNR (dB)")
        ax.set_title(t, fontsize=10)
    _legend_above(fig, *axes[0].get_legend_handles_labels())
    return f'<div class="panel plot">{_plot_img(fig, "stability vs SNR")}</div>'


def stability_section(m: Mapping) -> str:
    """The stability table (with the paper's rows when the SNRs match), caption and plot."""
    st = (m.get("tables") or {}).get("stability") or {}
    rows = st.get("rows") or []
    if not rows:
        return na("no stability rows in metrics.json")
    snrs, names, cells = pivot(rows, st.get("snrs") or [])
    names = [n for n in ("digit", "vq") if n in names] + [n for n in names if n not in ("digit", "vq")]
    paper = _paper_rows(snrs)
    return (_stability_table(names, snrs, cells, paper) + _stability_caption(rows, paper) +
            _stability_plot(names, snrs, cells, paper))


# ------------------------------------------------------------------------------------ linear probe

def _probe_acc(layer: Mapping) -> float | None:
    for k in ("top1", "test_top1", "test_acc", "accuracy", "acc"):
        v = layer.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _probe_table(probe: Mapping, models: list[str], acc: dict, all_layers: list[int]) -> str:
    """Top-1 per layer and model (best layer bold), then a "best (layer)" row."""
    body = []
    for l in all_layers:
        row = [str(l)]
        for model in models:
            v = acc[model].get(l)
            best = probe[model].get("best_layer") == l
            cell = f"{v * 100:.1f}%" if v is not None else num(None)
            row.append(f'<span class="best">{cell}</span>' if best and v is not None else cell)
        body.append(row)
    body.append(["<b>best (layer)</b>"] + [
        f'<b>{probe[k]["best_top1"] * 100:.1f}%</b> <span class="n">(layer {probe[k]["best_layer"]})</span>'
        if isinstance(probe[k].get("best_top1"), (int, float)) else num(None) for k in models])
    cls = [""] * (len(body) - 1) + ["sep"]
    head = ["layer"] + [f"{esc(model_label(k))} top-1" for k in models]
    return html_table(head, body, row_cls=cls)


def _probe_plot(models: list[str], acc: dict, all_layers: list[int]) -> str:
    fig, (ax,) = _figure(4.8, 3.1)
    for i, model in enumerate(models):
        pts = [(l, v * 100) for l, v in sorted(acc[model].items()) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=model_color(model, i), lw=1.8, ms=4,
                    label=model_label(model))
    ax.set_xlabel("layer (0-based block output)")
    ax.set_ylabel("linear-probe top-1 (%)")
    if all_layers:
        ax.set_xticks(all_layers)
    _legend_above(fig, *ax.get_legend_handles_labels())
    return f'<div class="panel plot">{_plot_img(fig, "linear probe accuracy vs layer")}</div>'


def probe_section(m: Mapping) -> str:
    """Linear-probe accuracy per layer: table and plot."""
    probe = (m.get("tables") or {}).get("probe") or {}
    if not probe:
        return na("no linear-probe results in metrics.json")
    models = [k for k in ("digit", "vq") if k in probe] + [k for k in probe if k not in ("digit", "vq")]
    acc: dict[str, dict[int, float | None]] = {}
    for model in models:
        layers = probe[model].get("layers") or []
        acc[model] = {int(l.get("layer", i)): _probe_acc(l) for i, l in enumerate(layers) if isinstance(l, dict)}
    all_layers = sorted({l for a in acc.values() for l in a})
    return ('<div class="grid2"><div>' + _probe_table(probe, models, acc, all_layers) +
            '<p class="sub">Frozen stage-1 GPT, mean-pooled hidden states of each block, one linear classifier per '
            'layer; bold: best layer.</p></div>' + _probe_plot(models, acc, all_layers) + '</div>')
