"""`python -m pipeline inspect reports/<run>/metrics.json`: every figure in a readable table, the
probe and stability tables in short form, `--json` machine-readable, `--markdown` the figures as a
Markdown table (what the README embeds)."""
from __future__ import annotations

import json

import pytest

from pipeline import cli
from pipeline.artifacts import figures_markdown, format_value, summarise, supported
from test_report import _metrics, _write_metrics


@pytest.fixture
def metrics(tmp_path):
    """(path, content) of a schema-valid metrics.json."""
    m = _metrics()
    return _write_metrics(tmp_path, m), m


def inspect(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _section(out: str, name: str) -> list[str]:
    """The lines under ``name:`` up to the next top-level key."""
    lines = out.splitlines()
    start = lines.index(f"{name}:") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return lines[start:end]


def test_text_shows_every_figure_in_a_table(metrics, capsys):
    path, m = metrics
    code, out, _ = inspect(capsys, path)
    assert code == 0
    head = out.splitlines()
    assert "kind: report metrics" in head and "run: toy" in head
    assert "git_commit: 0123456789abcdef" in head and "config_hash: cafe1234" in head
    table = _section(out, "figures")
    assert len(table) == 1 + len(m["figures"]), "a header and one line per figure"
    # word for word, aligned: model, metric, value (FID to 2 decimals), N
    assert table[0] == "  model      metric             value      N"
    assert table[1] == "  digit      fid                12.35   1000"
    assert table[7] == "  vq         fid                45.68   1000"
    assert table[6] == "  digit      final_loss           2.5      -"
    assert table[-1] == "  encoder    encoder_accuracy  0.8653  10000"
    for line, f in zip(table[1:], m["figures"]):
        assert line.split() == [f["model"], f["metric"], format_value(f["value"]),
                                format_value(f.get("n_samples"))]
    assert "..." not in out, "nothing is cut"


def test_text_shows_probe_and_stability_in_short_form(metrics, capsys):
    path, m = metrics
    out = inspect(capsys, path)[1]
    assert _section(out, "probe") == [
        "  model  best_layer  best_top1  test top-1 by layer",
        "  digit           1     0.7234  0.61 0.7234 0.69 0.65",
        "  vq              2     0.4876  0.41 0.45 0.4876 0.44",
    ]
    stability = _section(out, "stability")
    assert stability[0].split() == ["snr_db", "change", "digit", "change", "vq", "cosine", "digit", "cosine", "vq"]
    assert len(stability) == 1 + len(m["tables"]["stability"]["snrs"])
    assert stability[1].split() == ["30", "0.1", "0.2", "0.99", "0.99"]
    assert stability[-1].split() == ["0.01", "0.73", "0.83", "0.64", "0.29"]


def test_json_stays_machine_readable(metrics, capsys):
    path, m = metrics
    code, out, _ = inspect(capsys, path, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary == summarise(path)
    assert summary["kind"] == "report metrics" and summary["config_hash"] == "cafe1234"
    assert summary["figures"] == [{"model": f["model"], "metric": f["metric"], "value": f["value"],
                                   "N": f.get("n_samples")} for f in m["figures"]]
    assert [r["model"] for r in summary["probe"]] == ["digit", "vq"]


def test_markdown_table_of_the_figures(metrics, capsys):
    path, m = metrics
    code, out, _ = inspect(capsys, path, "--markdown")
    assert code == 0
    assert out == figures_markdown(m)
    lines = out.splitlines()
    assert lines[:3] == ["| model | metric | value | N |", "|---|---|--:|--:|", "| digit | fid | 12.35 | 1000 |"]
    assert "| digit | final_loss | 2.5 | - |" in lines
    assert "| tokenizer | vq_psnr | 24.56 | 10000 |" in lines
    assert len(lines) == 2 + len(m["figures"])
    for line, f in zip(lines[2:], m["figures"]):
        assert line == f"| {f['model']} | {f['metric']} | {format_value(f['value'])} | {format_value(f['n_samples'])} |"


def test_markdown_needs_a_metrics_json(tmp_path, metrics, capsys):
    other = tmp_path / "sidecar.json"
    other.write_text(json.dumps({"format": "something-else", "figures": []}))
    code, out, err = inspect(capsys, other, "--markdown")
    assert code == 2 and out == ""
    assert err == f"error: {other}: not a metrics.json of the report (format digit-metrics-v1)\n"
    code, _, err = inspect(capsys, metrics[0], "--markdown", "--json")
    assert code == 2 and err == "error: inspect: --markdown and --json exclude each other\n"


def test_other_json_is_still_a_sidecar(tmp_path):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"format": "something-else"}))
    assert summarise(other)["kind"] == "json sidecar"
    kinds = supported()
    assert kinds.index("report metrics.json (digit-metrics-v1)") < kinds.index(".json sidecar")


def test_format_value():
    assert [format_value(v) for v in (12.3456, 180.66463110915151, 0.7771, 0.032, 2.7970492839813232, 30.0, 2.0,
                                      5, None, "x")] == ["12.35", "180.66", "0.7771", "0.032", "2.797", "30.00", "2",
                                                         "5", "-", "x"]
