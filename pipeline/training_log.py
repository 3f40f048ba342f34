"""Training metrics: ``metrics.jsonl`` + ``metrics.csv`` (+ TensorBoard events when installed).

Written by rank 0 only. On resume the rows past the checkpoint's step are dropped, so the log of
an interrupted and resumed run equals the log of an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .io import atomic_path

METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed", "mfu"]


def read_rows(jsonl: Path) -> list[dict]:
    """The logged rows. A last line without its newline (an append cut short by a kill; its step is
    past every checkpoint, as rows are logged before the checkpoint of their step) is left out; any
    other line that is not JSON is a ValueError naming the file and line."""
    if not jsonl.exists():
        return []
    lines = jsonl.read_text().split("\n")[:-1]   # the part after the last newline is dropped
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{jsonl}: line {number} is not JSON ({e})") from e
    return rows


def read_last_loss(out_dir: Path) -> float | None:
    rows = read_rows(out_dir / "metrics.jsonl")
    return rows[-1]["loss"] if rows else None


class MetricsLog:
    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = [r for r in read_rows(self.jsonl) if r["step"] <= resume_step] if resume_step is not None else []
        with atomic_path(self.jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with atomic_path(self.csv) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
                w.writeheader()
                for r in rows:
                    w.writerow({k: r.get(k, "") for k in METRIC_COLUMNS})
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=(resume_step or 0) + 1)
        except Exception:  # tensorboard not installed: no events
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
