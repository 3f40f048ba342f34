"""Which settings change which artifact, next to the schema (``schemas/config.schema.yaml``).

Every stage gets two config fragments: the settings that change its output and the runtime
settings that do not (batch sizes, devices, worker and process counts). The Snakemake rules pass
the first as a rule parameter, so changing one of them reruns exactly the stages it affects, and
the second as a global that never triggers a rerun. ``python -m pipeline config --settings STAGE``
prints both for a stage.
"""
from __future__ import annotations

from typing import Callable

# keys that never change an artifact, per config section
RUNTIME_KEYS = {
    "shards": ("workers",),
    "encoder": ("batch_size", "num_workers", "device"),
    "vq": ("batch_size", "device"),
    "train": ("device", "processes"),
    "evaluate": ("batch_size", "device"),
}
VIEW_KEYS = ("resize", "crop", "image_size", "mean", "std")   # how views are cut from an image


def without_runtime(section: dict, name: str) -> dict:
    return {k: v for k, v in section.items() if k not in RUNTIME_KEYS[name]}


def runtime_of(section: dict, name: str) -> dict:
    return {k: section[k] for k in RUNTIME_KEYS[name] if k in section}


def encoder_settings(c: dict) -> dict:
    return without_runtime(c["encoder"], "encoder")


def view_settings(c: dict) -> dict:
    return {k: c["encoder"][k] for k in VIEW_KEYS}


def vq_settings(c: dict) -> dict:
    return without_runtime(c["vq"], "vq")


def evaluate_settings(c: dict, *keys: str) -> dict:
    return {k: c["evaluate"][k] for k in keys}


# stage -> the config fragment that changes its output
OUTPUT_SETTINGS: dict[str, Callable[[dict], dict]] = {
    "shards": lambda c: {"dataset": c["dataset"], "shards": without_runtime(c["shards"], "shards")},
    "train-encoder": lambda c: {"encoder": encoder_settings(c)},
    "features": lambda c: {"encoder": encoder_settings(c),
                           "kmeans": {k: c["kmeans"][k] for k in ("feature_view", "seed")}},
    "kmeans": lambda c: {"kmeans": c["kmeans"]},
    "tokens": lambda c: {"encoder": encoder_settings(c), "tokens": c["tokens"]},
    "train-vq": lambda c: {"vq": vq_settings(c), "encoder": view_settings(c)},
    "vq-tokens": lambda c: {"vq": vq_settings(c), "encoder": view_settings(c)},
    "train": lambda c: {"train": without_runtime(c["train"], "train")},
    "train-stage2": lambda c: {"stage2": {"train": without_runtime(c["stage2"]["train"], "train")}},
    "sample": lambda c: {"sample": c["sample"]},
    "probe": lambda c: {"probe": c["probe"]},
    "render": lambda c: {"stage2": {"sample": c["stage2"]["sample"]}, "vq": vq_settings(c)},
    "render-vq": lambda c: {"vq": vq_settings(c)},
    "reference": lambda c: {"evaluate": evaluate_settings(c, "network", "reference_split", "n_reference"),
                            "encoder": view_settings(c)},
    "score": lambda c: {"evaluate": evaluate_settings(c, "network", "reference_stats", "pr_k")},
    "stability": lambda c: {"encoder": encoder_settings(c), "vq": vq_settings(c),
                            "evaluate": evaluate_settings(c, "stability_images", "stability_snrs", "seed")},
    "report": lambda c: c,
}

# stage -> the runtime fragment (never a reason to rerun)
RUNTIME_SETTINGS: dict[str, Callable[[dict], dict]] = {
    "shards": lambda c: {"shards": runtime_of(c["shards"], "shards")},
    "train-encoder": lambda c: {},
    "features": lambda c: {"encoder": runtime_of(c["encoder"], "encoder")},
    "kmeans": lambda c: {},
    "tokens": lambda c: {"encoder": runtime_of(c["encoder"], "encoder")},
    "train-vq": lambda c: {},
    "vq-tokens": lambda c: {"vq": runtime_of(c["vq"], "vq")},
    "train": lambda c: {"train": runtime_of(c["train"], "train")},
    "train-stage2": lambda c: {"stage2": {"train": runtime_of(c["stage2"]["train"], "train")}},
    "sample": lambda c: {"train": {"device": c["train"]["device"]}},
    "probe": lambda c: {"train": {"device": c["train"]["device"]}},
    "render": lambda c: {"stage2": {"train": {"device": c["stage2"]["train"]["device"]}}},
    "render-vq": lambda c: {"stage2": {"train": {"device": c["stage2"]["train"]["device"]}}},
    "reference": lambda c: {"evaluate": runtime_of(c["evaluate"], "evaluate")},
    "score": lambda c: {"evaluate": runtime_of(c["evaluate"], "evaluate")},
    "stability": lambda c: {"encoder": runtime_of(c["encoder"], "encoder")},
    "report": lambda c: {},
}


def output_settings(stage: str, config: dict) -> dict:
    if stage not in OUTPUT_SETTINGS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(OUTPUT_SETTINGS)}")
    return OUTPUT_SETTINGS[stage](config)


def runtime_settings(stage: str, config: dict) -> dict:
    return RUNTIME_SETTINGS[stage](config)
