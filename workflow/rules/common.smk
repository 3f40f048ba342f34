# Helpers shared by the rules. PY is the interpreter running Snakemake, so rules use the same env.
# Which settings change which artifact lives in pipeline/settings.py, read by the CLI too.
import json
import shlex

from pipeline.config import evaluation_split, training_split
from pipeline.settings import RUNTIME_SETTINGS, output_settings, runtime_settings

PY = shlex.quote(sys.executable)
DATASET = config["dataset"]["name"]
RUN = config["run"]
# the splits the tiny tokenizers train and are tested on (pipeline.config: `train` else the first;
# the first of test / val / validation else the last)
TRAIN_SPLIT = training_split(config["dataset"]["splits"])
EVAL_SPLIT = evaluation_split(config["dataset"]["splits"])
MODELS = ("digit", "vq")   # stage-1 token kinds: DiGIT tokens (the method) and VQ tokens (the baseline)
# Rows that are rendered and scored (config `generators`), each under samples/{row}/: digit (DiGIT
# GPT + AR stage 2), digit_nar (DiGIT GPT + NAR stage 2), vq (VQ-token GPT), maskgit (MaskGIT over
# VQ tokens), mar and mar_causal (MAR and its causal variant over KL latents). ROW_SAMPLES: the
# folder holding each row's samples (samples.json); ROW_OUTPUT: the file with the drawn samples.
ROWS = ("digit", "digit_nar", "vq", "maskgit", "mar", "mar_causal")
GENERATORS = config["generators"]
ROW_SAMPLES = {"digit": "digit", "digit_nar": "digit", "vq": "vq", "maskgit": "maskgit", "mar": "mar",
               "mar_causal": "mar_causal"}
LATENT_ROWS = ("mar", "mar_causal")
ROW_OUTPUT = {row: "latents.npy" if row in LATENT_ROWS else "tokens.npy" for row in ROWS}
TOKEN_DIRS = {"digit": "tokens", "vq": "vq_tokens", "kl": "kl_latents"}
try:  # all of --cores locally; inside a cluster job Snakemake runs with --cores all (the job's CPUs)
    TORCH_THREADS = max(1, workflow.cores)
except WorkflowError:  # the submitting process of a cluster run has no --cores: the profile sets CPUs
    TORCH_THREADS = 1


def res(path):
    """An artifact of this run: results/{run}/{path} (wildcards in `path` stay wildcards)."""
    return f"results/{RUN}/{path}"


def logfile(name):
    return res(f"logs/{name}.log")


def cli_json(**sections):
    """A shell-quoted JSON config fragment for `python -m pipeline <stage> --json ...`."""
    return shlex.quote(json.dumps(sections, sort_keys=True))


def settings(stage):
    """The settings that change `stage`'s output, as a rule parameter: a change reruns the rule."""
    return lambda wc: cli_json(**output_settings(stage, config))


# Per stage, the settings that do not change its output (batch sizes, devices): used in the shell
# commands as {RUNTIME[stage]}, a global, so that changing one never triggers a rerun.
RUNTIME = {stage: cli_json(**runtime_settings(stage, config)) for stage in RUNTIME_SETTINGS}


def shard_name(tar):
    return os.path.basename(tar)[: -len(".tar")]


def token_files(split, model="digit"):
    return [res(f"{TOKEN_DIRS[model]}/{shard_name(t)}.npy") for t in shard_paths(split)]


def trained_or_given(section, trained, what, hint):
    """The tokenizer file: trained by this DAG (tiny demo) or a local checkpoint from the config."""
    if config[section]["train"] is not None:
        return res(trained)
    if config[section]["checkpoint"] is None:
        raise WorkflowError(f"config key '{section}.checkpoint' is null and '{section}.train' is not set: point "
                            f"{section}.checkpoint at {hint} or set {section}.train (tiny demo)")
    return config[section]["checkpoint"]


def encoder_file():
    return trained_or_given("encoder", "encoder/encoder.pt", "encoder", "local DINOv2 weights")


def vq_file():
    return trained_or_given("vq", "vq/vq.pt", "VQGAN", "a local taming-format VQGAN (MAGE's VQGAN for the paper)")


def kl_file():
    return trained_or_given("kl", "kl/kl.pt", "KL autoencoder", "MAR's local kl16.ckpt")


def training_shards(section, split):
    """Shards a tiny tokenizer trains on: the first `{section}.train.max_shards` of the split."""
    tars = shard_paths(split)
    limit = config[section]["train"]["max_shards"] if config[section]["train"] else None
    return tars[:limit] if limit else tars


def unique(items):
    return list(dict.fromkeys(items))


def vq_token_splits():
    """Splits whose VQ tokens some rule reads: both stage-1 trainings, stage 2 and the probes."""
    sections = [name for row, name in (("digit", "stage2"), ("digit_nar", "stage2_nar"), ("maskgit", "maskgit"))
                if row in GENERATORS]
    return unique([*config["train"]["splits"], *(s for name in sections for s in config[name]["train"]["splits"]),
                   config["probe"]["train_split"], config["probe"]["test_split"]])


def latent_rows():
    return [row for row in LATENT_ROWS if row in GENERATORS]


def kl_latent_splits():
    """Splits whose KL latents the configured MAR rows train on."""
    return unique([s for row in latent_rows() for s in config[row]["train"]["splits"]])


def digit_token_splits():
    """Splits that get DiGIT tokens: `tokens.splits`, and every split whose VQ tokens or KL latents
    are made (both read the DiGIT token sidecar of their shard: the crops)."""
    return unique([*config["tokens"]["splits"], *vq_token_splits(), *kl_latent_splits()])


def trained_generators():
    """Checkpoint folders under checkpoints/ that the configured rows (and probes) need."""
    names = list(MODELS)
    names += ["stage2"] if "digit" in GENERATORS else []
    names += ["stage2_nar"] if "digit_nar" in GENERATORS else []
    names += ["maskgit"] if "maskgit" in GENERATORS else []
    return names + latent_rows()


def sidecars(npy_files):
    return [f for npy in npy_files for f in (npy, npy[: -len(".npy")] + ".json")]


def all_targets(wildcards):
    """Every output of every job, not only the final ones: Snakemake checks a job's outputs only
    as far as some job requests them, so an output nobody reads (centroids.json next to the
    centroids.npy that tokens read, a sidecar .json) would never be rebuilt if it went missing."""
    targets = [f"shards/{DATASET}/manifest.parquet", f"shards/{DATASET}/dataset.json"]
    if config["encoder"]["train"] is not None:
        targets += [res("encoder/encoder.pt"), res("encoder/encoder.json")]
    targets += kmeans_stores(wildcards)
    targets += [res("kmeans/centroids.npy"), res("kmeans/centroids.json")]
    targets += sidecars([f for split in digit_token_splits() for f in token_files(split, "digit")])
    if config["vq"]["train"] is not None:
        targets += [res("vq/vq.pt"), res("vq/vq.json")]
    targets += sidecars([f for split in vq_token_splits() for f in token_files(split, "vq")])
    if latent_rows() and config["kl"]["train"] is not None:
        targets += [res("kl/kl.pt"), res("kl/kl.json")]
    targets += sidecars([f for split in kl_latent_splits() for f in token_files(split, "kl")])
    for name in trained_generators():
        targets += [res(f"checkpoints/{name}/final.pt"), res(f"checkpoints/{name}/train.json")]
    for model in MODELS:
        targets += [res(f"samples/{model}/{name}") for name in ("tokens.npy", "labels.npy", "samples.json")]
        targets += [res(f"probe/{model}.json")]
    for row in GENERATORS:
        targets += [res(f"samples/{ROW_SAMPLES[row]}/{name}")
                    for name in (ROW_OUTPUT[row], "labels.npy", "samples.json")]
        targets += [res(f"samples/{row}/{name}") for name in ("images.npz", "grid.png", "images.json")]
        targets += [res(f"eval/{row}.json")]
    targets += [res(f"eval/reference/{name}") for name in ("stats.npz", "features.npy", "reference.json")]
    targets += [res("eval/stability.json"), f"reports/{RUN}/metrics.json", f"reports/{RUN}/report.html"]
    return targets
