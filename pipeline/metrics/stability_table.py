"""The stability table's constants and layout, without torch (the report imports this).

Rows are dicts {tokenizer, snr_db, change_rate, cosine}; `pivot` arranges them like the paper's
Table 1 (SNR columns, one row per tokenizer and metric); `format_table` prints that as text.
"""
from __future__ import annotations

from typing import Sequence

SNRS_DB: tuple[float, ...] = (30, 25, 20, 15, 10, 5, 1, 0.01)

# The paper's Table 1 (ImageNet; DINOv2 + k-means "Disc" tokens vs VQGAN tokens), for comparison
# in reports. Columns are SNRS_DB.
PAPER_TABLE1 = {
    "vq": {"change_rate": [0.187, 0.317, 0.487, 0.663, 0.805, 0.901, 0.948, 0.956],
           "cosine": [0.972, 0.949, 0.910, 0.853, 0.777, 0.682, 0.594, 0.571]},
    "digit": {"change_rate": [0.114, 0.178, 0.260, 0.355, 0.457, 0.570, 0.687, 0.721],
              "cosine": [0.975, 0.960, 0.940, 0.916, 0.888, 0.855, 0.816, 0.803]},
}

LABELS = {"digit": "DiGIT", "vq": "VQ"}


def pivot(rows: Sequence[dict], snrs: Sequence[float] = ()) -> tuple[list[float], list[str], dict]:
    """(SNR columns in order of appearance, after ``snrs``; tokenizer names; {(tokenizer, snr): row})."""
    snr_list = [float(s) for s in snrs]
    names: list[str] = []
    cells: dict[tuple[str, float], dict] = {}
    for r in rows:
        s = float(r["snr_db"])
        if s not in snr_list:
            snr_list.append(s)
        if r["tokenizer"] not in names:
            names.append(r["tokenizer"])
        cells[(r["tokenizer"], s)] = r
    return snr_list, names, cells


def _snr_label(s: float) -> str:
    return f"{s:g}"


def format_table(rows: Sequence[dict], digits: int = 3) -> str:
    """A plain-text (Markdown pipe) table laid out like the paper's Table 1: SNR (dB) as columns;
    one "token change" row per tokenizer, then one "cos-sim" row per tokenizer."""
    snrs, names, cells = pivot(rows)
    body = [["SNR (dB)", *(_snr_label(s) for s in snrs)]]
    for metric, label in (("change_rate", "token change (lower: more stable)"),
                          ("cosine", "token cos-sim (higher: more stable)")):
        for name in names:
            vals = [f"{cells[(name, s)][metric]:.{digits}f}" if (name, s) in cells else "-" for s in snrs]
            body.append([f"{LABELS.get(name, name)} {label}", *vals])
    widths = [max(len(row[i]) for row in body) for i in range(len(body[0]))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                        for i, (c, w) in enumerate(zip(row, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(body[0]), sep, *(fmt(r) for r in body[1:])])
