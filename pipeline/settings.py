"""Which settings change which artifact, next to the schema (``schemas/config.schema.yaml``).

Every stage gets two config fragments: the settings that change its output and the runtime
settings that do not (batch sizes, devices, worker and process counts, part sizes). The Snakemake
rules pass the first as a rule parameter, so changing one of them reruns exactly the stages it
affects, and the second as a global that never triggers a rerun. ``python -m pipeline config
--settings STAGE`` prints both for a stage.

A stage's command sees only these two fragments (every other key takes its schema default), so
together they must hold every key the stage's code reads; a key the code does not read belongs to
neither (e.g. ``encoder.layer`` for the tiny encoder's training, which trains the whole ViT).
Keys that only choose a stage's input files (``kmeans.shards``, ``tokens.splits``, ...) are left
out too: Snakemake reruns a job whose set of input files changes.
"""
from __future__ import annotations

import copy
from typing import Callable

from .config import deep_update

# keys that never change an artifact, per config section ("stage2.train": a nested section)
RUNTIME_KEYS: dict[str, tuple[str, ...]] = {
    "shards": ("workers",),
    "encoder": ("batch_size", "num_workers", "device"),
    "kmeans": ("device",),
    "vq": ("batch_size", "device"),
    "kl": ("batch_size", "device"),
    "train": ("device", "processes"),
    "stage2.train": ("device", "processes"),
    "stage2_nar.train": ("device", "processes"),
    "maskgit.train": ("device", "processes"),
    "mar.train": ("device", "processes"),
    "mar_causal.train": ("device", "processes"),
    "sample": ("batch_size", "chunk"),           # sample i is seeded from (seed, i): no batch/part effect
    "stage2.sample": ("batch_size", "chunk"),
    "stage2_nar.sample": ("batch_size", "chunk"),
    "maskgit.sample": ("batch_size", "chunk"),
    "mar.sample": ("batch_size", "chunk"),
    "mar_causal.sample": ("batch_size", "chunk"),
    "evaluate": ("batch_size", "device"),
}
VIEW_KEYS = ("resize", "crop", "image_size", "mean", "std")   # how views are cut from an image
# what the NAR stage 2 reads of stage2_nar.sample when it renders (not the sample counts)
NAR_RENDER_KEYS = ("iterations", "choice_temperature", "temperature", "top_k", "top_p", "seed")


def section(c: dict, name: str) -> dict:
    for part in name.split("."):
        c = c[part]
    return c


def nested(name: str, value: dict) -> dict:
    """{"stage2": {"train": value}} for "stage2.train"."""
    for part in reversed(name.split(".")):
        value = {part: value}
    return value


def without_runtime(c: dict, name: str) -> dict:
    return {k: v for k, v in section(c, name).items() if k not in RUNTIME_KEYS[name]}


def runtime_of(c: dict, name: str) -> dict:
    s = section(c, name)
    return {k: s[k] for k in RUNTIME_KEYS[name] if k in s}


def pick(c: dict, name: str, *keys: str) -> dict:
    s = section(c, name)
    return {k: s[k] for k in keys}


def view_settings(c: dict) -> dict:
    return pick(c, "encoder", *VIEW_KEYS)


def encoder_model(c: dict) -> dict:
    """The frozen encoder as the stages that run it read it (``load_configured_encoder``): the
    tiny encoder trained here (its file is the rule's input; ``train`` only has to be set, and
    changing it retrains that file) or ``arch`` + ``checkpoint``; then the block and the views."""
    enc = c["encoder"]
    which = {"train": enc["train"]} if enc["train"] is not None else pick(c, "encoder", "arch", "checkpoint")
    return {**which, "layer": enc["layer"], **view_settings(c)}


def vq_model(c: dict) -> dict:
    """The VQGAN as the stages that load it read it (``load_configured_vq``): the architecture,
    and the checkpoint when it is not trained here (the trained file is the rule's input)."""
    vq = c["vq"]
    return {**pick(c, "vq", "preset", "model"), **({"checkpoint": vq["checkpoint"]} if vq["train"] is None else {})}


def kl_model(c: dict) -> dict:
    """The KL autoencoder as the stages that load it read it (``load_configured_kl``), like ``vq_model``."""
    kl = c["kl"]
    return {**pick(c, "kl", "preset", "model"), **({"checkpoint": kl["checkpoint"]} if kl["train"] is None else {})}


def strip_runtime(c: dict) -> dict:
    """The whole config without any runtime key."""
    out = copy.deepcopy(c)
    for name, keys in RUNTIME_KEYS.items():
        s = section(out, name)
        for k in keys:
            s.pop(k, None)
    return out


def all_runtime(c: dict) -> dict:
    out: dict = {}
    for name in RUNTIME_KEYS:
        fragment = nested(name, runtime_of(c, name))
        deep_update(out, fragment)
    return out


# stage -> the config fragment that changes its output
OUTPUT_SETTINGS: dict[str, Callable[[dict], dict]] = {
    "shards": lambda c: {"dataset": c["dataset"], "shards": without_runtime(c, "shards")},
    "train-encoder": lambda c: {"encoder": {**view_settings(c), "train": c["encoder"]["train"]}},
    "features": lambda c: {"encoder": {**encoder_model(c), "precision": c["encoder"]["precision"]},
                           "kmeans": pick(c, "kmeans", "feature_view", "seed")},
    "kmeans": lambda c: {"kmeans": pick(c, "kmeans", "k", "niter", "seed", "sample", "max_points_per_centroid",
                                        "spherical")},
    "tokens": lambda c: {"encoder": {**encoder_model(c), "precision": c["encoder"]["precision"]},
                         "tokens": pick(c, "tokens", "views", "seed")},
    "train-vq": lambda c: {"vq": {**pick(c, "vq", "preset", "model"), "train": c["vq"]["train"]},
                           "encoder": view_settings(c)},
    "vq-tokens": lambda c: {"vq": vq_model(c), "encoder": view_settings(c)},
    "train": lambda c: {"train": without_runtime(c, "train")},
    "train-stage2": lambda c: nested("stage2.train", without_runtime(c, "stage2.train")),
    "train-stage2-nar": lambda c: nested("stage2_nar.train", without_runtime(c, "stage2_nar.train")),
    "train-maskgit": lambda c: nested("maskgit.train", without_runtime(c, "maskgit.train")),
    "sample": lambda c: {"sample": without_runtime(c, "sample")},
    "sample-maskgit": lambda c: nested("maskgit.sample", without_runtime(c, "maskgit.sample")),
    "train-kl": lambda c: {"kl": {**pick(c, "kl", "preset", "model"), "train": c["kl"]["train"]},
                           "encoder": view_settings(c)},
    "kl-latents": lambda c: {"kl": kl_model(c), "encoder": view_settings(c)},
    "train-mar": lambda c: nested("mar.train", without_runtime(c, "mar.train")),
    "train-mar-causal": lambda c: nested("mar_causal.train", without_runtime(c, "mar_causal.train")),
    "sample-mar": lambda c: nested("mar.sample", without_runtime(c, "mar.sample")),
    "sample-mar-causal": lambda c: nested("mar_causal.sample", without_runtime(c, "mar_causal.sample")),
    "render-latents": lambda c: {"kl": kl_model(c)},
    "probe": lambda c: {"probe": c["probe"]},
    "render": lambda c: {**nested("stage2.sample", without_runtime(c, "stage2.sample")), "vq": vq_model(c)},
    "render-nar": lambda c: {**nested("stage2_nar.sample", pick(c, "stage2_nar.sample", *NAR_RENDER_KEYS)),
                             "vq": vq_model(c)},
    "render-vq": lambda c: {"vq": vq_model(c)},
    "reference": lambda c: {"evaluate": pick(c, "evaluate", "network", "reference_split", "n_reference"),
                            "encoder": view_settings(c)},
    "score": lambda c: {"evaluate": pick(c, "evaluate", "network", "reference_stats", "pr_k", "kid_subsets",
                                         "kid_subset_size", "fid_resamples", "interval_level", "interval_seed")},
    "stability": lambda c: {"encoder": encoder_model(c), "vq": vq_model(c),
                            "evaluate": pick(c, "evaluate", "stability_images", "stability_snrs", "seed")},
    # metrics.json records the config (and its hash): every setting but the runtime ones
    "report": strip_runtime,
}


def _device(name: str) -> Callable[[dict], dict]:
    return lambda c: nested(name, pick(c, name, "device"))


def _both(*parts: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def merged(c: dict) -> dict:
        out: dict = {}
        for part in parts:
            deep_update(out, part(c))
        return out
    return merged


def _runtime(name: str) -> Callable[[dict], dict]:
    return lambda c: nested(name, runtime_of(c, name))


# stage -> the runtime fragment (never a reason to rerun)
RUNTIME_SETTINGS: dict[str, Callable[[dict], dict]] = {
    "shards": _runtime("shards"),
    "train-encoder": lambda c: {},
    "features": _runtime("encoder"),
    "kmeans": _runtime("kmeans"),
    "tokens": _runtime("encoder"),
    "train-vq": lambda c: {},
    "vq-tokens": _runtime("vq"),
    "train": _runtime("train"),
    "train-stage2": _runtime("stage2.train"),
    "train-stage2-nar": _runtime("stage2_nar.train"),
    "train-maskgit": _runtime("maskgit.train"),
    "sample": _both(_runtime("sample"), _device("train")),
    "sample-maskgit": _both(_runtime("maskgit.sample"), _device("maskgit.train")),
    "train-kl": lambda c: {},
    "kl-latents": _runtime("kl"),
    "train-mar": _runtime("mar.train"),
    "train-mar-causal": _runtime("mar_causal.train"),
    "sample-mar": _both(_runtime("mar.sample"), _device("mar.train")),
    "sample-mar-causal": _both(_runtime("mar_causal.sample"), _device("mar_causal.train")),
    "render-latents": _runtime("kl"),
    "probe": _device("train"),
    "render": _both(_runtime("stage2.sample"), _device("stage2.train")),
    "render-nar": _both(_runtime("stage2_nar.sample"), _device("stage2_nar.train")),
    "render-vq": _both(_runtime("stage2.sample"), _device("stage2.train")),
    "reference": _runtime("evaluate"),
    "score": _runtime("evaluate"),
    "stability": _runtime("encoder"),
    "report": all_runtime,
}


def output_settings(stage: str, config: dict) -> dict:
    if stage not in OUTPUT_SETTINGS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(OUTPUT_SETTINGS)}")
    return OUTPUT_SETTINGS[stage](config)


def runtime_settings(stage: str, config: dict) -> dict:
    if stage not in RUNTIME_SETTINGS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(RUNTIME_SETTINGS)}")
    return RUNTIME_SETTINGS[stage](config)
