"""report.html from a synthetic, schema-valid metrics.json and small real artifacts."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.report import NOT_AVAILABLE, main, render_html, write_report

ROOT = Path(__file__).resolve().parents[1]
SNRS = [30, 25, 20, 15, 10, 5, 1, 0.01]
RUN = "toy"


def _grid_png(path: Path, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (2 * 30, 4 * 30, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path.read_bytes()


def _jsonl(path: Path, steps: int, start_loss: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s * 10, "epoch": s / 20, "loss": start_loss * (0.9 ** s) + 1.0, "lr": 1e-3,
             "tokens_per_s": 1000.0 + s, "grad_norm": 0.5, "elapsed": 3.0 * s} for s in range(1, steps + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 999, "lo')  # a torn last line


def _prov(**extra) -> dict:
    return {"config_hash": "cafe1234", "git_commit": "0123456789abcdef", **extra}


def _metrics(with_optional: bool = True) -> dict:
    figs = []
    for model, fid, n in (("digit", 12.3456, 1000), ("vq", 45.6789, 1000)):
        prov = _prov(checkpoint_sha256="ab" * 32, samples_sha256="cd" * 32, reference_stats_sha256="ef" * 32,
                     feature_network="inception-2015-12-05", sampling={"top_k": 200, "temperature": 1.0},
                     seeds={"sample": 0}, source=f"results/{RUN}/eval/{model}.json")
        figs += [
            {"id": f"fid/{model}", "metric": "fid", "model": model, "value": fid, "n_samples": n, "provenance": prov},
            {"id": f"is/{model}", "metric": "is_mean", "model": model, "value": 3.21, "n_samples": n,
             "provenance": prov},
            {"id": f"is_std/{model}", "metric": "is_std", "model": model, "value": 0.12, "n_samples": n,
             "provenance": prov},
            {"id": f"precision/{model}", "metric": "precision", "model": model, "value": 0.654, "n_samples": n,
             "provenance": prov},
            {"id": f"recall/{model}", "metric": "recall", "model": model, "value": 0.321, "n_samples": n,
             "provenance": prov},
            {"id": f"final_loss/{model}", "metric": "final_loss", "model": model, "value": 2.5, "n_samples": None,
             "provenance": _prov(source=f"results/{RUN}/checkpoints/{model}/train.json")},
        ]
    figs += [
        {"id": "vq_psnr/tokenizer", "metric": "vq_psnr", "model": "tokenizer", "value": 24.56, "n_samples": 10000,
         "provenance": _prov(source=f"results/{RUN}/vq/vq.json")},
        {"id": "encoder_accuracy/encoder", "metric": "encoder_accuracy", "model": "encoder", "value": 0.8653,
         "n_samples": 10000, "provenance": _prov(source=f"results/{RUN}/encoder/encoder.json")},
    ]
    stab_rows = []
    for tok, base in (("digit", 0.1), ("vq", 0.2)):
        for i, s in enumerate(SNRS):
            stab_rows.append({"tokenizer": tok, "snr_db": s, "change_rate": min(1.0, base + 0.09 * i),
                              "cosine": 0.99 - 0.05 * i * (2 if tok == "vq" else 1), "images": 500})
    probe = {model: {"layers": [{"layer": l, "train_acc": 0.5 + 0.05 * l, "test_acc": acc}
                                for l, acc in enumerate(accs)],
                     "best_layer": int(np.argmax(accs)), "best_top1": max(accs),
                     "provenance": {"checkpoint_sha256": "12" * 32, "source": f"results/{RUN}/probe/{model}.json"}}
             for model, accs in (("digit", [0.61, 0.7234, 0.69, 0.65]), ("vq", [0.41, 0.45, 0.4876, 0.44]))}
    m = {
        "format": "digit-metrics-v1", "run": RUN, "created": "2025-01-02T03:04:05+00:00",
        "git_commit": "0123456789abcdef", "git_dirty": False, "config_hash": "cafe1234",
        "config": {"run": RUN, "dataset": {"name": "fashion_mnist"}},
        "figures": figs,
        "tables": {"stability": {"snrs": SNRS, "rows": stab_rows, "provenance": {"images": 500, "seed": 0}},
                   "probe": probe,
                   "sweep": [{"top_k": k, "top_p": 1.0, "fid": 20.0 - k / 100, "n_samples": 1000}
                             for k in (50, 100, 200)] if with_optional else None},
        "artifacts": {
            "grids": {"digit": f"results/{RUN}/samples/digit/grid.png", "vq": f"results/{RUN}/samples/vq/grid.png"},
            "training": {m: f"results/{RUN}/checkpoints/{m}/metrics.jsonl" for m in ("digit", "vq", "stage2")},
            "vq_history": f"results/{RUN}/vq/vq.json",
            "encoder": f"results/{RUN}/encoder/encoder.json",
        },
    }
    return m


def _validate(m: dict) -> None:
    schema = yaml.safe_load((ROOT / "pipeline/schemas/metrics.schema.yaml").read_text())
    jsonschema.validate(m, schema)


@pytest.fixture
def workdir(tmp_path):
    """A working directory with every artifact metrics.json names; returns (workdir, grid bytes)."""
    grids = {m: _grid_png(tmp_path / f"results/{RUN}/samples/{m}/grid.png", i) for i, m in enumerate(("digit", "vq"))}
    for m, loss in (("digit", 6.0), ("vq", 7.0), ("stage2", 5.0)):
        _jsonl(tmp_path / f"results/{RUN}/checkpoints/{m}/metrics.jsonl", 30, loss)
    (tmp_path / f"results/{RUN}/vq").mkdir(parents=True)
    (tmp_path / f"results/{RUN}/vq/vq.json").write_text(json.dumps({"history": [
        {"epoch": e, "rec_loss": 0.1 / e, "vq_loss": 0.02 / e, "test_psnr_first_1000": 18 + e} for e in (1, 2, 3)]}))
    (tmp_path / f"results/{RUN}/encoder").mkdir(parents=True)
    (tmp_path / f"results/{RUN}/encoder/encoder.json").write_text(json.dumps({"history": [
        {"epoch": e, "train_loss": 1.0 / e, "test_accuracy": 0.7 + 0.05 * e} for e in (1, 2, 3)]}))
    return tmp_path, grids


def _write_metrics(workdir: Path, m: dict) -> Path:
    _validate(m)
    path = workdir / f"reports/{RUN}/metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    return path


def _png_imgs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_full_report(workdir):
    wd, grids = workdir
    metrics = _write_metrics(wd, _metrics())
    out = wd / f"reports/{RUN}/report.html"
    write_report(metrics, out, workdir=wd)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # self-contained: no external resource, no script
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    # headline: FIDs, each with its N
    assert re.search(r"12\.35<span class=\"n\">N=1,000</span>", html)
    assert re.search(r"45\.68<span class=\"n\">N=1,000</span>", html)
    assert "3.21 ± 0.12" in html and "0.654" in html and "0.321" in html
    assert "small sample sizes" in html and "N=50,000" in html
    # header
    for s in ("toy", "2025-01-02T03:04:05+00:00", "0123456789abcdef", "cafe1234", "fashion_mnist"):
        assert s in html
    # both grids embedded byte for byte; plots embedded as PNG too
    imgs = _png_imgs(html)
    assert grids["digit"] in imgs and grids["vq"] in imgs
    assert len(imgs) >= 2 + 5  # grids + training, VQ, encoder, stability, probe plots
    for data in imgs:
        Image.open(io.BytesIO(data)).verify()
    # stability table: every SNR column, change-rate and cosine rows for both tokenizers
    stab = html[html.index('id="stability"'):html.index('id="probe"')]
    head = re.search(r"<thead>(.*?)</thead>", stab).group(1)
    assert re.findall(r"<th>(.*?)</th>", head) == ["SNR (dB)"] + [f"{s:g}" for s in SNRS]
    for s in ("DiGIT (disc.) token change rate", "VQ token change rate", "DiGIT (disc.) token cosine similarity",
              "VQ token cosine similarity", "0.100", "0.990", "paper Table 1"):
        assert s in stab
    # probe table: per layer top-1 for both models, best marked
    probe = html[html.index('id="probe"'):html.index('id="other"')]
    assert "DiGIT top-1" in probe and "VQ baseline top-1" in probe
    assert '<span class="best">72.3%</span>' in probe and '<span class="best">48.8%</span>' in probe
    assert "61.0%" in probe and "44.0%" in probe
    # other figures, sweep, provenance
    other = html[html.index('id="other"'):]
    assert "24.56" in other and "86.53%" in other and "final training loss" in other
    assert 'id="sweep"' in html and "top_k" in html
    prov = html[html.index('id="provenance"'):]
    assert "<details>" in prov and "inception-2015-12-05" in prov and "ef" * 32 in prov
    assert "tables.probe.digit" in prov
    assert NOT_AVAILABLE not in html
    # atomic write: nothing but the report next to it
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json", "report.html"]


def test_missing_artifacts_say_not_available(workdir):
    wd, grids = workdir
    m = _metrics(with_optional=False)
    (wd / m["artifacts"]["grids"]["vq"]).unlink()
    (wd / m["artifacts"]["training"]["stage2"]).unlink()
    (wd / m["artifacts"]["vq_history"]).write_text("{not json")
    del m["artifacts"]["encoder"]
    html = render_html(m, workdir=wd)
    assert html.count(NOT_AVAILABLE) >= 4
    assert f"results/{RUN}/samples/vq/grid.png does not exist" in html
    assert f"results/{RUN}/checkpoints/stage2/metrics.jsonl does not exist" in html
    imgs = _png_imgs(html)
    assert grids["digit"] in imgs and grids["vq"] not in imgs
    assert 'id="sweep"' not in html and 'href="#sweep"' not in html  # tables.sweep null: no section
    # no artifacts at all, empty tables: still a page
    m2 = _metrics(with_optional=False)
    del m2["artifacts"]
    m2["tables"] = {"stability": {"rows": [], "provenance": {}}, "probe": {}}
    m2["figures"] = []
    _validate(m2)
    html2 = render_html(m2, workdir=wd)
    assert "Latent-space stability" in html2 and html2.count(NOT_AVAILABLE) >= 6


def test_cli_and_overwrite(workdir, monkeypatch, capsys):
    wd, _ = workdir
    metrics = _write_metrics(wd, _metrics())
    out = wd / "out/report.html"
    out.parent.mkdir()
    out.write_text("old")
    monkeypatch.chdir(wd)
    assert main([str(metrics), "out/report.html"]) == 0
    first = out.read_bytes()
    assert first != b"old" and b"12.35" in first
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]
    main([str(metrics), "out/report.html"])
    assert out.read_bytes() == first  # deterministic: same input, same bytes


def test_every_generator_row_side_by_side_with_n_and_route(workdir):
    """The four rows of the default DAG (DiGIT + AR / NAR stage 2, VQ GPT, MaskGIT): one headline row
    and one sample grid each, in that order, with N, what generated them and the checkpoints."""
    wd, grids = workdir
    m = _metrics()
    rows = {"digit": ("gpt", "gpt", None), "digit_nar": ("gpt", "maskgit", 8), "vq": ("gpt", None, None),
            "maskgit": ("maskgit", None, 8)}
    for i, (row, (family, stage2, iterations)) in enumerate(rows.items()):
        if row in ("digit_nar", "maskgit"):
            grids[row] = _grid_png(wd / f"results/{RUN}/samples/{row}/grid.png", 7 + i)
            m["artifacts"]["grids"][row] = f"results/{RUN}/samples/{row}/grid.png"
        sampling = {"stage1": {"top_k": 50, **({"iterations": iterations} if family == "maskgit" else {})},
                    "stage2": {"iterations": iterations} if stage2 == "maskgit" else {"top_p": 0.8} if stage2 else None}
        prov = _prov(family=family, stage2_family=stage2, checkpoint_sha256=f"{i}a" * 32,
                     stage2_checkpoint_sha256=f"{i}b" * 32 if stage2 else None, sampling=sampling)
        fig = next((f for f in m["figures"] if f["id"] == f"fid/{row}"), None)
        if fig is None:
            m["figures"].append({"id": f"fid/{row}", "metric": "fid", "model": row, "value": 100.0 + i,
                                 "n_samples": 100, "provenance": prov})
        else:
            fig["provenance"] = prov
    html = render_html(_metrics_roundtrip(wd, m), workdir=wd)
    head = html[html.index('id="headline"'):html.index('id="samples"')]
    order = [head.index(f"<b>{label}</b>") for label in ("DiGIT", "DiGIT + NAR stage 2", "VQ baseline",
                                                          "MaskGIT (VQ tokens)")]
    assert order == sorted(order)
    assert "101.00<span class=\"n\">N=100</span>" in head and "103.00<span class=\"n\">N=100</span>" in head
    assert "NAR stage 2: MaskGIT (mask-predict), 8 iterations → VQGAN" in head
    assert "AR stage 2: GPT (autoregressive) → VQGAN" in head
    assert "VQ tokens, MaskGIT (mask-predict), 8 iterations" in head and "stage 2 1b1b1b1b1b" in head
    samples = html[html.index('id="samples"'):html.index('id="training"')]
    assert samples.index("DiGIT + NAR stage 2") < samples.index("VQ baseline") < samples.index("MaskGIT (VQ tokens)")
    assert "FID 103.00, N=100" in samples
    imgs = _png_imgs(html)
    assert all(grids[row] in imgs for row in rows)


def _metrics_roundtrip(workdir: Path, m: dict) -> dict:
    return json.loads(_write_metrics(workdir, m).read_text())
