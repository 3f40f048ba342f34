"""Evaluate stage (DiGIT step 8): reference statistics, scores of every sample set, metrics.json.

    reference_stage(config, tars, out_dir)            real images of evaluate.reference_split ->
                                                      stats.npz (mu, sigma), features.npy, reference.json
    score_stage(config, images_npz, reference_dir, out_json)
                                                      FID with its intervals, KID, IS (where the
                                                      network has logits), precision/recall of one
                                                      sample set
    metrics_stage(config, inputs, out_json)           every figure + provenance -> metrics.json
                                                      (validated against pipeline/schemas/metrics.schema.yaml)

Reference images are the view-0 crops (resize shorter side, centre crop: the pixels the VQGAN
renders) of the first ``n_reference`` images of the reference split (all with 0). FID uses the
user's statistics file when ``evaluate.reference_stats`` is set (e.g. ADM's ImageNet 256 batch);
precision/recall always need real features, so those come from the reference split.

Before scoring, reference.json must record the configured network and the sha256 of its
stats.npz, and statistics that name their network (ours) must name the configured one.

Uncertainty at small N (DESIGN.md, "Small-N evaluation"), from the same Inception features:

* ``fid_interval``: the FID's sampling spread at this N by half-sampling (``fid.fid_half_sample``:
  ``fid_resamples`` random halves of the generated features, the reference statistics fixed,
  spread centred on the full-sample FID). The report and ``tables.separability`` use it: two rows
  whose intervals overlap are *not separable at this N*.
* ``fid_bootstrap``: the percentile bootstrap over the generated features (``fid.fid_bootstrap``),
  recorded as the issue asked, not used: at N < 2048 a resample holds ~0.63 N distinct images and
  FID's small-N bias pushes the resampled values above the point estimate (the interval can
  exclude it) and inflates their spread.
* ``kid`` / ``kid_std``: KID (unbiased MMD^2, cubic kernel) over ``kid_subsets`` subset pairs of
  min(``kid_subset_size``, N_generated // 2, N_reference // 2) features: half-samples at small N,
  where whole-set subsets would give kid_std = 0. Needs the reference features, so it is null
  (with ``kid_reason``) when ``evaluate.reference_stats`` supplies mu/sigma only.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError, config_hash
from .data import ViewSpec, centre_views
from .devices import resolve_device
from .feature_network import FeatureNet, load_feature_network
from .fid_stats import load_stats, save_stats
from .io import file_sha256, read_json, write_json_atomic, write_npy_atomic
from .metrics import fid
from .metrics import kid as kid_metric
from .provenance import require_same

METRICS_FORMAT = "digit-metrics-v1"
METRICS_SCHEMA = Path(__file__).resolve().parent / "schemas" / "metrics.schema.yaml"


def _network(config: dict) -> FeatureNet:
    ev = config["evaluate"]
    return load_feature_network(ev["network"], resolve_device(ev["device"]))


def reference_stage(config: dict, tars: list[str], out_dir: str, *, progress: bool = True) -> dict:
    ev = config["evaluate"]
    out = Path(out_dir)
    t0 = time.time()
    net = _network(config)
    views, where = centre_views(tars, ViewSpec.from_config(config["encoder"]), int(ev["n_reference"]))
    images = views.permute(0, 2, 3, 1).numpy()
    feats, _ = net.extract(images, int(ev["batch_size"]), progress, desc="inception reference")
    mu, sigma = fid.activation_statistics(feats)
    save_stats(out / "stats.npz", mu, sigma, len(feats), net.id)
    write_npy_atomic(out / "features.npy", feats.astype(np.float32))
    keys = hashlib.sha256("\n".join(f"{w['shard']}/{w['key']}" for w in where).encode()).hexdigest()
    meta = {"stage": "reference", "split": ev["reference_split"], "n": len(feats),
            "n_requested": int(ev["n_reference"]), "view": 0, "keys_sha256": keys,
            "shards": [{"path": str(t), "sha256": file_sha256(t)} for t in tars],
            "feature_network": net.id, "stats_sha256": file_sha256(out / "stats.npz"),
            "image_size": list(images.shape[1:3]), "seconds": round(time.time() - t0, 2)}
    write_json_atomic(out / "reference.json", meta)
    print(f"[reference] {len(feats)} real images of {ev['reference_split']} -> {out} ({meta['seconds']} s)",
          file=sys.stderr)
    return meta


def _checked_reference(ref_dir: Path, net: FeatureNet) -> dict:
    """reference.json of ``ref_dir``, whose features must come from the configured network and
    whose stats.npz must be the file it records."""
    ref_json = ref_dir / "reference.json"
    ref_meta = read_json(ref_json)
    require_same("feature network", f"the configured network {net.path}", net.id, ref_json,
                 ref_meta["feature_network"], "the reference features come from another network; rerun the "
                                              "reference stage")
    if ref_meta.get("stats_sha256"):
        require_same("sha256", ref_dir / "stats.npz", file_sha256(ref_dir / "stats.npz"), ref_json,
                     ref_meta["stats_sha256"], "the reference statistics were replaced or half-written; rerun the "
                                               "reference stage")
    return ref_meta


def _sample_images(images_npz: str, ref_meta: dict) -> np.ndarray:
    """The rendered images, which must have the reference images' size."""
    with np.load(images_npz) as z:
        images = z["images"]
    if images.shape[1:3] != tuple(ref_meta["image_size"]):
        raise ValueError(f"{images_npz}: images are {images.shape[1:3]}, the reference images "
                         f"{tuple(ref_meta['image_size'])}")
    return images


def _fid_reference(ev: dict, ref_dir: Path) -> tuple[dict, str]:
    """(statistics, path) FID compares against: the user's file when set, else the reference stage's."""
    path = ev["reference_stats"] or str(ref_dir / "stats.npz")
    return load_stats(path), path


def _check_stats_network(stats: dict, path: str, net: FeatureNet) -> None:
    """Statistics that record their network (ours do, ADM's do not) must come from ``net``."""
    if stats.get("network_id") is not None:
        require_same("feature network", f"the configured network {net.path}", net.id, path, stats["network_id"],
                     "the FID statistics come from another network; recompute them with this one")


KID_SUBSET_RULE = ("min(evaluate.kid_subset_size, N_generated // 2, N_reference // 2): half-samples below "
                   "2 x kid_subset_size, so that kid_std is the spread at this N")
BOOTSTRAP_NOTE = ("recorded, not used: at N < 2048 features a resample holds ~0.63 N distinct images and FID's "
                  "small-N bias pushes resampled values above the point estimate and inflates their spread; "
                  "fid_interval (half-sampling) is the interval that covers")
INTERVAL_KEYS = ("low", "high", "std", "level", "resamples", "method", "resample_mean")


def kid_subset_size(cap: int, n_generated: int, n_reference: int) -> int:
    """KID_SUBSET_RULE: the configured cap, at most half of either set (at least 2)."""
    return max(2, min(int(cap), n_generated // 2, n_reference // 2))


def fid_uncertainty(ev: dict, feats: np.ndarray, ref: dict, real: np.ndarray | None) -> dict:
    """FID against the fixed reference statistics ``ref`` with its intervals, and KID against the
    reference features ``real`` (None: user statistics without features, KID null): the score json's
    fid, fid_interval, fid_bootstrap, kid, kid_std, kid_subsets, kid_subset_size and their notes."""
    n, d = feats.shape
    seed, resamples = int(ev["interval_seed"]), int(ev["fid_resamples"])
    # the D x D factor of the reference covariance only pays off on the D x D route (N >= D)
    factor = fid.reference_factor(ref["sigma"]) if n >= d else None
    out = {"fid": fid.frechet_distance_to_reference(feats, ref["mu"], ref["sigma"], ref_factor=factor),
           "fid_interval": None, "fid_bootstrap": None, "fid_interval_reason": None}
    if resamples == 0:
        out["fid_interval_reason"] = "evaluate.fid_resamples is 0"
    elif n < 4:
        out["fid_interval_reason"] = f"half-sampling needs at least 4 generated images, got {n}"
    else:
        kw = {"resamples": resamples, "seed": seed, "level": float(ev["interval_level"]), "ref_factor": factor}
        half = fid.fid_half_sample(feats, ref["mu"], ref["sigma"], **kw)
        boot = fid.fid_bootstrap(feats, ref["mu"], ref["sigma"], **kw)
        out["fid_interval"] = {**{k: half[k] for k in INTERVAL_KEYS}, "seed": seed}
        out["fid_bootstrap"] = {**{k: boot[k] for k in INTERVAL_KEYS}, "seed": seed, "note": BOOTSTRAP_NOTE}
    out.update({"kid": None, "kid_std": None, "kid_subsets": int(ev["kid_subsets"]), "kid_subset_size": None,
                "kid_subset_rule": KID_SUBSET_RULE, "kid_seed": seed, "kid_reason": None})
    if real is None:
        out["kid_reason"] = ("evaluate.reference_stats gives mu/sigma only; KID needs the reference features "
                             "its FID is against")
    elif min(n, len(real)) < 4:
        out["kid_reason"] = f"KID needs at least 4 images per set, got {n} generated and {len(real)} reference"
    else:
        m = kid_subset_size(ev["kid_subset_size"], n, len(real))
        k = kid_metric.kid(real, feats, subsets=int(ev["kid_subsets"]), subset_size=m, seed=seed)
        out.update({"kid": k["kid"], "kid_std": k["kid_std"], "kid_subsets": k["subsets"],
                    "kid_subset_size": k["subset_size"]})
    return out


def score_stage(config: dict, images_npz: str, reference_dir: str, out_json: str, *, progress: bool = True) -> dict:
    """FID (with intervals) / KID / IS / precision-recall of the images in ``images_npz`` against
    the reference."""
    ev = config["evaluate"]
    t0 = time.time()
    net = _network(config)
    ref_dir = Path(reference_dir)
    images = _sample_images(images_npz, _checked_reference(ref_dir, net))
    ref, ref_stats_path = _fid_reference(ev, ref_dir)
    _check_stats_network(ref, ref_stats_path, net)
    feats, logits = net.extract(images, int(ev["batch_size"]), progress, desc=f"inception {Path(images_npz).parent.name}")
    t_features = time.time() - t0
    real = np.load(ref_dir / "features.npy")
    precision, recall = fid.precision_recall(real, feats, k=int(ev["pr_k"]))
    t1 = time.time()
    unc = fid_uncertainty(ev, feats, ref, None if ev["reference_stats"] else real)
    t_uncertainty = time.time() - t1
    is_mean = is_std = None
    if logits is not None:
        is_mean, is_std = fid.inception_score(logits, splits=min(10, max(1, len(logits) // 100)))
    images_meta = read_json(Path(images_npz).with_suffix(".json"))
    result = {"stage": "score", "images": str(images_npz), "images_sha256": file_sha256(images_npz),
              "n_samples": int(len(images)), "fid": float(unc.pop("fid")), **unc,
              "is_mean": is_mean, "is_std": is_std,
              "precision": float(precision), "recall": float(recall), "pr_k": int(ev["pr_k"]),
              "n_reference": ref["n"], "reference_stats": ref_stats_path,
              "reference_stats_sha256": file_sha256(ref_stats_path), "n_reference_features": int(len(real)),
              "feature_network": net.id, "render": images_meta, "seconds": round(time.time() - t0, 2),
              "seconds_features": round(t_features, 2), "seconds_uncertainty": round(t_uncertainty, 2)}
    write_json_atomic(out_json, result)
    is_txt = f", IS {is_mean:.3f}" if is_mean is not None else ""
    iv = result["fid_interval"]
    iv_txt = f" [{iv['low']:.2f}, {iv['high']:.2f}]" if iv else ""
    kid_txt = f", KID {result['kid']:.5f} ± {result['kid_std']:.5f}" if result["kid"] is not None else ""
    print(f"[score] {images_npz}: FID {result['fid']:.3f}{iv_txt} (N={len(images)} vs {ref['n']} real){kid_txt}"
          f"{is_txt}, precision {precision:.3f}, recall {recall:.3f}", file=sys.stderr)
    return result


# -- metrics.json --------------------------------------------------------------------------------------

def git_commit(repo: Path | None = None) -> tuple[str | None, bool | None]:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def _figure(fid_: str, metric: str, model: str, value, base: dict, n=None, **prov) -> dict:
    return {"id": fid_, "metric": metric, "model": model, "value": None if value is None else float(value),
            "n_samples": None if n is None else int(n), "provenance": {**base, **prov}}


# rows of the generation table (config `generators`), in this order
ROWS = ("digit", "digit_nar", "vq", "maskgit", "mar", "mar_causal")
# what each row is: the stage-1 generator's family, and the stage 2 that renders it (None: decoded directly)
ROW_MODELS = {"digit": ("gpt", "gpt"), "digit_nar": ("gpt", "maskgit"), "vq": ("gpt", None),
              "maskgit": ("maskgit", None), "mar": ("mar", None), "mar_causal": ("mar_causal", None)}
# checkpoint folders whose training summaries give a final loss
TRAINED = ("digit", "vq", "stage2", "stage2_nar", "maskgit", "mar", "mar_causal")
STAGE2_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "iterations", "choice_temperature")


def _generation_figures(model: str, score: dict, samples: dict, base: dict) -> list[dict]:
    render = score["render"]
    prov = {"family": samples.get("family", "gpt"), "stage2_family": render.get("stage2_family"),
            "checkpoint_sha256": samples.get("checkpoint_sha256"),
            "stage2_checkpoint_sha256": render.get("stage2_checkpoint_sha256"),
            "vq_checkpoint_sha256": render.get("vq_checkpoint_sha256"),
            "kl_checkpoint_sha256": render.get("kl_checkpoint_sha256"),
            "samples_sha256": score["images_sha256"],
            "reference_stats_sha256": score["reference_stats_sha256"],
            "feature_network": score["feature_network"],
            "sampling": {"stage1": {k: samples.get(k) for k in ("temperature", "top_k", "top_p", "cfg_scale",
                                                                  "iterations", "choice_temperature",
                                                                  "num_iter", "num_sampling_steps", "clip_x0",
                                                                  "cfg_schedule", "n_per_class", "n")
                                    if k in samples},
                         "stage2": {k: render.get(k) for k in STAGE2_SAMPLING_KEYS if k in render}
                         if render.get("stage2_checkpoint_sha256") else None},
            "seeds": {"stage1": samples.get("seed"), "stage1_rule": samples.get("seed_rule"),
                      "stage2": render.get("seed"), "stage2_rule": render.get("seed_rule")},
            "source": score["images"]}
    n = score["n_samples"]
    figs = [_figure(f"{m}/{model}", m, model, score[m], base, n, **prov)
            for m in ("fid", "precision", "recall")]
    if "fid_interval" in score:   # score jsons from before the intervals have none
        interval = score["fid_interval"]
        figs[0]["low"] = interval["low"] if interval else None
        figs[0]["high"] = interval["high"] if interval else None
        figs[0]["provenance"].update(interval=interval, fid_bootstrap=score.get("fid_bootstrap"),
                                     interval_reason=score.get("fid_interval_reason"))
    if "kid" in score:
        kid_prov = {**prov, **{k: score.get(k) for k in KID_PROVENANCE}}
        figs += [_figure(f"{m}/{model}", m, model, score[m], base, n, **kid_prov) for m in ("kid", "kid_std")]
    if score.get("is_mean") is not None:
        figs += [_figure(f"{m}/{model}", m, model, score[m], base, n, **prov) for m in ("is_mean", "is_std")]
    return figs


KID_PROVENANCE = ("kid_subsets", "kid_subset_size", "kid_subset_rule", "kid_seed", "kid_reason")
KID_SEPARABILITY = "KID mean ± 2 std over subsets (half-samples at small N: ~ the spread at N)"


def _pair_bounds(score: dict) -> tuple[list | None, list | None]:
    """A row's FID interval and KID mean ± 2 std as [low, high] (None where the score has none)."""
    iv = score.get("fid_interval")
    fid_b = [iv["low"], iv["high"]] if iv else None
    kid_b = ([score["kid"] - 2 * score["kid_std"], score["kid"] + 2 * score["kid_std"]]
             if score.get("kid") is not None and score.get("kid_std") is not None else None)
    return fid_b, kid_b


def separability_table(scores: dict[str, dict]) -> dict | None:
    """tables.separability: for every pair of rows (in ``scores``' order) whether their FID intervals
    are disjoint (``fid.separable``; null when either has none, or when N differs: FID's small-N bias
    depends on N, so FIDs at different N do not compare) and whether their KID mean ± 2 std are
    (unbiased, so any N compares). ``separable`` is the FID verdict, the issue's criterion. None
    when no row has an interval (score jsons from before them)."""
    if not any("fid_interval" in s for s in scores.values()):
        return None
    rows = list(scores)
    bounds = {r: _pair_bounds(scores[r]) for r in rows}
    methods = {s["fid_interval"]["method"] for s in scores.values() if s.get("fid_interval")}
    levels = {s["fid_interval"]["level"] for s in scores.values() if s.get("fid_interval")}
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            (fa, ka), (fb, kb) = bounds[a], bounds[b]
            na, nb = scores[a]["n_samples"], scores[b]["n_samples"]
            if fa is None or fb is None:
                missing = " and ".join(r for r, f in ((a, fa), (b, fb)) if f is None)
                fid_sep, reason = None, f"no FID interval for {missing}"
            elif na != nb:
                fid_sep, reason = None, f"FID at different N ({na} vs {nb}) does not compare"
            else:
                fid_sep, reason = fid.separable(fa, fb), None
            kid_sep = fid.separable(ka, kb) if ka is not None and kb is not None else None
            pairs.append({"a": a, "b": b, "n_a": na, "n_b": nb, "fid_a": fa, "fid_b": fb, "kid_a": ka, "kid_b": kb,
                          "fid_separable": fid_sep, "kid_separable": kid_sep, "separable": fid_sep,
                          "reason": reason})
    return {"fid_interval": {"method": "; ".join(sorted(methods)) or None,
                             "level": levels.pop() if len(levels) == 1 else None},
            "kid_rule": KID_SEPARABILITY, "pairs": pairs}


def _probe_entry(p: dict, base: dict, source: str) -> dict:
    """tables.probe.{model}: per-layer accuracies, the best layer, chance and provenance."""
    return {"layers": p["per_layer"], "best_layer": int(p["best_layer"]),
            "best_top1": float(p["best_test_acc"]), "chance": p.get("chance"),
            "provenance": {**base, "checkpoint_sha256": p.get("checkpoint_sha256"), "source": source}}


def _tokenizer_figures(inputs: dict, base: dict) -> list[dict]:
    """VQ reconstruction PSNR and encoder accuracy, for the artifacts that are given."""
    figures = []
    if inputs.get("vq"):
        v = read_json(inputs["vq"])
        figures.append(_figure("vq_psnr/tokenizer", "vq_psnr", "tokenizer", v.get("test_psnr"), base,
                               v.get("test_images"), vq_checkpoint_sha256=v.get("sha256"), source=inputs["vq"]))
    if inputs.get("kl"):
        k = read_json(inputs["kl"])
        figures.append(_figure("kl_psnr/tokenizer", "kl_psnr", "tokenizer", k.get("test_psnr"), base,
                               k.get("test_images"), kl_checkpoint_sha256=k.get("sha256"), source=inputs["kl"]))
    if inputs.get("encoder"):
        e = read_json(inputs["encoder"])
        figures.append(_figure("encoder_accuracy/tokenizer", "encoder_accuracy", "tokenizer",
                               e.get("test_accuracy"), base, e.get("test_images"),
                               checkpoint_sha256=e.get("sha256"), source=inputs["encoder"]))
    return figures


def _stability_entry(st: dict, base: dict, source: str) -> dict:
    """tables.stability: the SNR columns, the rows and how they were measured."""
    return {"snrs": st["snr_db"], "rows": [{k: r[k] for k in ("tokenizer", "snr_db", "change_rate", "cosine")}
                                            for r in st["rows"]],
            "provenance": {**base, "n_images": st["n_images"], "seed": st["seed"], "noise": st["noise"],
                           "tokenizers": st["tokenizers"], "source": source}}


def _artifacts(run: str, inputs: dict) -> dict:
    """The files report.html reads, relative to the working directory."""
    return {"grids": {m: f"results/{run}/samples/{m}/grid.png" for m in ROWS if f"score_{m}" in inputs},
            "training": {m: f"results/{run}/checkpoints/{m}/metrics.jsonl" for m in TRAINED
                         if f"train_{m}" in inputs},
            "vq_history": inputs.get("vq"), "encoder": inputs.get("encoder")}


def metrics_stage(config: dict, inputs: dict, out_json: str) -> dict:
    """Gather every figure of the run into metrics.json. ``inputs`` maps names to artifact paths:
    score_{row} and samples_{row} (the stage-1 samples.json) for every row of ``generators``,
    probe_{model} for model in digit/vq, train_{name} (train.json) for the trained generators
    (digit, vq, stage2, stage2_nar, maskgit, mar, mar_causal: those given), stability, and optionally
    vq (vq.json), kl (kl.json) and encoder (encoder.json)."""
    commit, dirty = git_commit()
    chash = config_hash(config)
    base = {"config_hash": chash, "git_commit": commit}
    figures, probe = [], {}
    rows = [r for r in ROWS if r in config.get("generators", ROWS)]
    missing = [f"{kind}_{r}" for r in rows for kind in ("score", "samples") if f"{kind}_{r}" not in inputs]
    if missing:
        raise ConfigError(f"the report needs --input {', '.join(missing)} (the rows of config key 'generators': "
                          f"{', '.join(rows)})")
    scores = {}
    for row in rows:
        score, samples = read_json(inputs[f"score_{row}"]), read_json(inputs[f"samples_{row}"])
        figures += _generation_figures(row, score, samples, base)
        scores[row] = score
    for model in ("digit", "vq"):
        p = read_json(inputs[f"probe_{model}"])
        probe[model] = _probe_entry(p, base, inputs[f"probe_{model}"])
        figures.append(_figure(f"probe_top1/{model}", "probe_top1", model, p["best_test_acc"], base,
                               p.get("n_test"), checkpoint_sha256=p.get("checkpoint_sha256"),
                               source=inputs[f"probe_{model}"]))
    for model in (m for m in TRAINED if f"train_{m}" in inputs):
        t = read_json(inputs[f"train_{model}"])
        figures.append(_figure(f"final_loss/{model}", "final_loss", model, t.get("final_loss"), base, None,
                               checkpoint_sha256=t.get("checkpoint_sha256"), source=inputs[f"train_{model}"]))
    figures += _tokenizer_figures(inputs, base)
    stability = _stability_entry(read_json(inputs["stability"]), base, inputs["stability"])
    run = config["run"]
    metrics = {"format": METRICS_FORMAT, "run": run, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "git_commit": commit, "git_dirty": dirty, "config_hash": chash, "config": config,
               "figures": figures, "tables": {"stability": stability, "probe": probe, "sweep": None,
                                              "separability": separability_table(scores)},
               "artifacts": _artifacts(run, inputs)}
    validate_metrics(metrics)
    write_json_atomic(out_json, metrics)
    return metrics


def validate_metrics(metrics: dict) -> None:
    import jsonschema
    import yaml
    schema = yaml.safe_load(METRICS_SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(json.loads(json.dumps(metrics)))
