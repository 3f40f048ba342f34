# Helpers shared by the rules. PY is the interpreter running Snakemake, so rules use the same env.
import json
import shlex

PY = shlex.quote(sys.executable)
DATASET = config["dataset"]["name"]
RUN = config["run"]


def cli_json(**sections):
    """A shell-quoted JSON config fragment for `python -m pipeline <stage> --json ...`.

    Only the sections a rule depends on are passed, so Snakemake's params trigger reruns
    exactly when those settings change.
    """
    return shlex.quote(json.dumps(sections, sort_keys=True))


def shard_settings():
    """Shard settings that change the output (worker count does not)."""
    return {k: v for k, v in config["shards"].items() if k != "workers"}


def all_targets(wildcards):
    return [
        f"shards/{DATASET}/manifest.parquet",
        *token_targets(),
        *[f"results/{RUN}/samples/{model}/images.npz" for model in ("digit", "vq")],
        *[f"results/{RUN}/probe/{model}.json" for model in ("digit", "vq")],
        f"reports/{RUN}/metrics.json",
        f"reports/{RUN}/report.html",
    ]
