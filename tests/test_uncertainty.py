"""Issue 15, part 1: an uncertainty on every generation figure. The score stage records KID and the
FID intervals (reference fixed) from the same features, metrics.json carries them as figures and
tables.separability, the report shows them and says which differences are separable at this N.

The score stage runs with a stand-in feature network (48-d 'features' of the pixels) so that it
takes well under a second; the numbers must equal direct calls of the maths in pipeline.metrics."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import evaluate as E
from pipeline import feature_network as NET
from pipeline.config import validate_config
from pipeline.fid_stats import save_stats
from pipeline.io import file_sha256
from pipeline.metrics import fid as M
from pipeline.metrics import kid as K
from pipeline.report import render_html
from pipeline.settings import output_settings

ROOT = Path(__file__).resolve().parents[1]
D = 48


class StubNet(NET.FeatureNet):
    """'Features': a fixed random projection of the pixels, squashed (48-d, no logits)."""

    def __init__(self):
        self.id, self.path = "stub:features", Path("stub")
        self.proj = np.random.default_rng(0).normal(size=(8 * 8 * 3, D)) / 40.0

    def extract(self, images, batch_size=32, progress=False, desc=""):
        x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
        return np.tanh(x @ self.proj), None


def _config(**evaluate) -> dict:
    cfg = validate_config(yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()))
    cfg["evaluate"].update({"kid_subsets": 10, "fid_resamples": 20, **evaluate})
    return cfg


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """A reference folder (60 real 'images') and 40 generated ones; the stub network in place."""
    net = StubNet()
    monkeypatch.setattr(E, "_network", lambda config: net)
    rng = np.random.default_rng(1)
    real_images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    fake_images = np.clip(rng.integers(0, 256, (40, 8, 8, 3)) * 0.8 + 30, 0, 255).astype(np.uint8)
    ref = tmp_path / "reference"
    ref.mkdir()
    real = net.extract(real_images)[0]
    save_stats(ref / "stats.npz", *M.activation_statistics(real), len(real), net.id)
    np.save(ref / "features.npy", real.astype(np.float32))
    (ref / "reference.json").write_text(json.dumps({"feature_network": net.id, "image_size": [8, 8],
                                                    "stats_sha256": file_sha256(ref / "stats.npz")}))
    images = tmp_path / "samples" / "images.npz"
    images.parent.mkdir()
    np.savez(images, images=fake_images)
    images.with_suffix(".json").write_text(json.dumps({"stage": "render", "seed": 0}))
    return net, ref, images, net.extract(fake_images)[0], np.load(ref / "features.npy")


def test_score_records_kid_and_intervals_equal_to_the_maths(scored, tmp_path):
    net, ref, images, fake, real = scored
    cfg = _config()
    res = E.score_stage(cfg, str(images), str(ref), str(tmp_path / "score.json"), progress=False)
    assert json.loads((tmp_path / "score.json").read_text()) == json.loads(json.dumps(res))
    stats = np.load(ref / "stats.npz")
    mu, sigma = stats["mu"], stats["sigma"]
    # FID: the fixed-reference route, equal to the classic one on the statistics
    assert res["fid"] == M.frechet_distance_to_reference(fake, mu, sigma)
    assert res["fid"] == pytest.approx(M.frechet_distance(*M.activation_statistics(fake), mu, sigma), rel=1e-9)
    half = M.fid_half_sample(fake, mu, sigma, resamples=20, seed=0, level=0.95)
    boot = M.fid_bootstrap(fake, mu, sigma, resamples=20, seed=0, level=0.95)
    for key, direct in (("fid_interval", half), ("fid_bootstrap", boot)):
        got = res[key]
        assert {k: got[k] for k in ("low", "high", "std", "level", "resamples", "method", "resample_mean")} == \
            {k: direct[k] for k in ("low", "high", "std", "level", "resamples", "method", "resample_mean")}, key
        assert got["seed"] == 0 and got["resamples"] == 20 and got["level"] == 0.95
    assert res["fid_interval"]["method"] == M.HALF_SAMPLE_METHOD
    assert res["fid_interval"]["low"] < res["fid"] < res["fid_interval"]["high"]   # centred on the point
    assert "biased" not in res["fid_interval"] and "bias" in res["fid_bootstrap"]["note"]
    assert res["fid_interval_reason"] is None
    # KID: half-samples of the smaller set (40 // 2), 10 subsets, the interval seed
    direct = K.kid(real, fake, subsets=10, subset_size=20, seed=0)
    assert (res["kid"], res["kid_std"], res["kid_subsets"], res["kid_subset_size"]) == \
        (direct["kid"], direct["kid_std"], 10, 20)
    assert res["kid_std"] > 0 and res["kid_reason"] is None and "N_generated // 2" in res["kid_subset_rule"]
    assert E.kid_subset_size(1000, 100, 500) == 50 and E.kid_subset_size(1000, 50_000, 50_000) == 1000
    assert E.kid_subset_size(300, 1000, 500) == 250
    # another seed, other draws; the same seed, the same numbers
    again = E.score_stage(_config(interval_seed=3), str(images), str(ref), str(tmp_path / "s3.json"), progress=False)
    assert again["fid"] == res["fid"] and again["kid"] != res["kid"]
    assert again["fid_interval"]["low"] != res["fid_interval"]["low"]


def test_score_without_reference_features_or_resamples(scored, tmp_path):
    """User statistics (mu/sigma only): FID and its interval against them, KID null with the reason;
    fid_resamples 0: no intervals, with the reason."""
    net, ref, images, fake, real = scored
    user = tmp_path / "adm_stats.npz"
    mu, sigma = M.activation_statistics(real[:50] + 0.1)
    np.savez(user, mu=mu, sigma=sigma)
    res = E.score_stage(_config(reference_stats=str(user)), str(images), str(ref), str(tmp_path / "u.json"),
                        progress=False)
    assert res["fid"] == M.frechet_distance_to_reference(fake, mu, sigma)
    assert res["fid_interval"]["low"] == M.fid_half_sample(fake, mu, sigma, resamples=20)["low"]
    assert res["kid"] is None and res["kid_std"] is None and "reference_stats" in res["kid_reason"]
    off = E.score_stage(_config(fid_resamples=0), str(images), str(ref), str(tmp_path / "o.json"), progress=False)
    assert off["fid_interval"] is None and off["fid_bootstrap"] is None
    assert off["fid_interval_reason"] == "evaluate.fid_resamples is 0" and off["kid"] is not None


def test_interval_settings_rerun_scoring_only():
    cfg = _config()
    for key, value in (("fid_resamples", 50), ("interval_level", 0.9), ("interval_seed", 1), ("kid_subsets", 20),
                       ("kid_subset_size", 500)):
        new = copy.deepcopy(cfg)
        new["evaluate"][key] = value
        assert output_settings("score", new) != output_settings("score", cfg), key
        assert output_settings("reference", new) == output_settings("reference", cfg), key
    bad = copy.deepcopy(cfg)
    bad["evaluate"]["fid_resamples"] = 1
    with pytest.raises(Exception, match="fid_resamples"):
        validate_config(bad)


# -- metrics.json and the report from constructed score jsons ---------------------------------------

def _score(row: str, fid: float, low: float, high: float, kid: float | None, kid_std: float | None,
           n: int = 100) -> dict:
    interval = {"low": low, "high": high, "std": (high - low) / 4, "level": 0.95, "resamples": 200,
                "method": M.HALF_SAMPLE_METHOD, "resample_mean": fid + 5, "seed": 0}
    return {"stage": "score", "images": f"results/toy/samples/{row}/images.npz", "images_sha256": "ab" * 32,
            "n_samples": n, "fid": fid, "fid_interval": interval,
            "fid_bootstrap": {**interval, "low": low + 8, "high": high + 9, "method": M.BOOTSTRAP_METHOD,
                              "note": E.BOOTSTRAP_NOTE},
            "fid_interval_reason": None, "kid": kid, "kid_std": kid_std, "kid_subsets": 100,
            "kid_subset_size": None if kid is None else n // 2, "kid_subset_rule": E.KID_SUBSET_RULE,
            "kid_seed": 0, "kid_reason": None if kid is not None else "evaluate.reference_stats gives mu/sigma only",
            "is_mean": None, "is_std": None, "precision": 0.5, "recall": 0.4, "pr_k": 3,
            "n_reference": 500, "reference_stats": "ref/stats.npz", "reference_stats_sha256": "cd" * 32,
            "n_reference_features": 500, "feature_network": "stub", "render": {"seed": 0}}


SCORES = {  # digit and vq overlap, maskgit is clear of both, mar has no KID, mar_causal another N
    "digit": _score("digit", 180.0, 172.0, 188.5, 0.050, 0.004),
    "vq": _score("vq", 186.0, 178.0, 194.0, 0.055, 0.004),
    "maskgit": _score("maskgit", 240.0, 231.0, 249.0, 0.120, 0.006),
    "mar": _score("mar", 120.0, 110.0, 130.0, None, None),
    "mar_causal": _score("mar_causal", 90.0, 85.0, 95.0, 0.02, 0.002, n=200),
}


@pytest.fixture
def metrics(tmp_path):
    inputs = {}
    for row, score in SCORES.items():
        for kind, content in (("score", score), ("samples", {"family": "gpt", "seed": 0})):
            path = tmp_path / f"{kind}_{row}.json"
            path.write_text(json.dumps(content))
            inputs[f"{kind}_{row}"] = str(path)
    for model in ("digit", "vq"):
        path = tmp_path / f"probe_{model}.json"
        path.write_text(json.dumps({"per_layer": [{"layer": 0, "test_acc": 0.5}], "best_layer": 0,
                                    "best_test_acc": 0.5}))
        inputs[f"probe_{model}"] = str(path)
    (tmp_path / "stability.json").write_text(json.dumps({
        "snr_db": [30], "rows": [{"tokenizer": "digit", "snr_db": 30, "change_rate": 0.1, "cosine": 0.9}],
        "n_images": 10, "seed": 0, "noise": "gaussian", "tokenizers": ["digit"]}))
    inputs["stability"] = str(tmp_path / "stability.json")
    config = {"run": "toy", "generators": list(SCORES)}
    return E.metrics_stage(config, inputs, str(tmp_path / "metrics.json"))   # validated against the schema


def test_metrics_json_carries_kid_intervals_and_separability(metrics):
    figs = {f["id"]: f for f in metrics["figures"]}
    fid = figs["fid/digit"]
    assert (fid["value"], fid["low"], fid["high"]) == (180.0, 172.0, 188.5)
    assert fid["provenance"]["interval"] == SCORES["digit"]["fid_interval"]
    assert fid["provenance"]["fid_bootstrap"]["note"] == E.BOOTSTRAP_NOTE
    assert figs["kid/digit"]["value"] == 0.05 and figs["kid_std/digit"]["value"] == 0.004
    assert figs["kid/digit"]["n_samples"] == 100 and figs["kid/digit"]["provenance"]["kid_subset_size"] == 50
    assert figs["kid/mar"]["value"] is None and "reference_stats" in figs["kid/mar"]["provenance"]["kid_reason"]
    pairs = {(p["a"], p["b"]): p for p in metrics["tables"]["separability"]["pairs"]}
    assert len(pairs) == 10   # every pair of the five rows
    assert pairs["digit", "vq"] == {"a": "digit", "b": "vq", "n_a": 100, "n_b": 100, "fid_a": [172.0, 188.5],
                                    "fid_b": [178.0, 194.0], "kid_a": pytest.approx([0.042, 0.058]),
                                    "kid_b": pytest.approx([0.047, 0.063]), "fid_separable": False,
                                    "kid_separable": False, "separable": False, "reason": None}
    assert pairs["digit", "maskgit"]["separable"] is True and pairs["digit", "maskgit"]["kid_separable"] is True
    assert pairs["digit", "mar"]["separable"] is True and pairs["digit", "mar"]["kid_separable"] is None
    far = pairs["digit", "mar_causal"]
    assert far["separable"] is None and "different N" in far["reason"] and far["kid_separable"] is True
    assert metrics["tables"]["separability"]["fid_interval"]["level"] == 0.95
    # a score json from before the intervals: no low/high, no KID figures, no table
    old = {k: v for k, v in SCORES["digit"].items() if not k.startswith(("kid", "fid_"))}
    figs_old = E._generation_figures("digit", old, {}, {"config_hash": "x", "git_commit": None})
    assert "low" not in figs_old[0] and not any(f["metric"].startswith("kid") for f in figs_old)
    assert E.separability_table({"digit": old}) is None


def test_report_shows_intervals_and_says_what_is_separable(metrics):
    html = render_html(metrics)
    head = html[html.index('id="headline"'):html.index('id="samples"')]
    assert "KID ×10³ ↓" in head
    assert '180.00 [172.00, 188.50]<span class="n">N=100</span>' in head
    assert "50.00 ± 4.00" in head and "120.00 ± 6.00" in head
    assert 'title="evaluate.reference_stats gives mu/sigma only"' in head   # MAR's KID: a dash with the reason
    assert "95% interval of the FID at this N by half-sampling (200 random halves" in head
    assert ("DiGIT vs VQ baseline: not separable at N=100 (FID intervals overlap; KID ± 2 std overlap)."
            in head)
    assert ("DiGIT vs MaskGIT (VQ tokens): separable at N=100 (FID intervals disjoint; KID ± 2 std disjoint)."
            in head)
    assert "DiGIT vs MAR (KL latents): separable at N=100 (FID intervals disjoint)." in head
    assert ("DiGIT vs MAR causal (KL latents): FIDs do not compare (N=100 vs N=200: FID's bias depends on N); "
            "KID ± 2 std disjoint." in head)
    sentences = head[head.index('<ul class="pairs">'):]
    assert sentences.count("<li>") == 10
    assert sentences.index(": separable at") < sentences.index("not separable at") < sentences.index("do not compare")
    other = html[html.index('id="other"'):html.index('id="provenance"')]
    assert "kid" not in other   # KID and its std live in the headline table


def test_report_without_intervals_is_unchanged(metrics):
    """A metrics.json from before the intervals: no KID column, no brackets, no sentences."""
    m = copy.deepcopy(metrics)
    m["figures"] = [f for f in m["figures"] if not f["metric"].startswith("kid")]
    for f in m["figures"]:
        f.pop("low", None), f.pop("high", None)
        for k in ("interval", "fid_bootstrap", "interval_reason"):
            f["provenance"].pop(k, None)
    m["tables"]["separability"] = None
    E.validate_metrics(m)
    head = render_html(m)
    head = head[head.index('id="headline"'):head.index('id="samples"')]
    assert "KID" not in head and "[" not in head and "separable" not in head
    assert '180.00<span class="n">N=100</span>' in head
