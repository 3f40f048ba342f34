# The discriminative tokenizer: encoder -> features (k-means sample shards only) -> k-means ->
# tokens (fused encode-and-assign for every shard). Per-shard rules make it incremental.

wildcard_constraints:
    split="[A-Za-z0-9_]+",
    shard_id="[0-9]{6}",


ENCODER_OUTPUT_KEYS = ("arch", "checkpoint", "layer", "resize", "crop", "image_size", "mean", "std", "precision", "train")
try:  # all of --cores locally; inside a cluster job Snakemake runs with --cores all (the job's CPUs)
    TORCH_THREADS = max(1, workflow.cores)
except WorkflowError:  # the submitting process of a cluster run has no --cores: the profile sets CPUs
    TORCH_THREADS = 1


def encoder_settings():
    """Encoder settings that change features (batch size, workers and device do not)."""
    return {k: config["encoder"][k] for k in ENCODER_OUTPUT_KEYS}


def view_settings():
    """How views are cut (all that the VQ tokenizer and the reference images depend on)."""
    return {k: config["encoder"][k] for k in ("resize", "crop", "image_size", "mean", "std")}


# Settings that do not change results: passed as a global so they never trigger reruns.
ENCODER_RUNTIME = cli_json(encoder={k: config["encoder"][k] for k in ("batch_size", "num_workers", "device")})


def encoder_file():
    if config["encoder"]["train"] is not None:
        return f"results/{RUN}/encoder/encoder.pt"
    if config["encoder"]["checkpoint"] is None:
        raise WorkflowError("config key 'encoder.checkpoint' is null and 'encoder.train' is not set: point "
                            "encoder.checkpoint at local DINOv2 weights or set encoder.train (tiny demo)")
    return config["encoder"]["checkpoint"]


def encoder_arg():
    return f"--encoder {shlex.quote(encoder_file())}"


def kmeans_stores(wildcards):
    tars = shard_paths(config["kmeans"]["split"])
    if config["kmeans"]["shards"]:
        tars = tars[: config["kmeans"]["shards"]]
    return [f"results/{RUN}/features/{os.path.basename(t)[:-4]}.zarr" for t in tars]


def token_targets():
    return [f"results/{RUN}/tokens/{os.path.basename(t)[:-4]}.npy"
            for split in config["tokens"]["splits"] for t in shard_paths(split)]


def encoder_train_shards(split):
    tars = shard_paths(split)
    limit = config["encoder"]["train"]["max_shards"] if config["encoder"]["train"] else None
    return tars[:limit] if limit else tars


rule train_encoder:
    input:
        train=lambda wc: encoder_train_shards("train"),
        test=lambda wc: encoder_train_shards(config["dataset"]["splits"][-1]),
    output:
        pt=f"results/{RUN}/encoder/encoder.pt",
        meta=f"results/{RUN}/encoder/encoder.json",
    params:
        cfg=lambda wc: cli_json(encoder=encoder_settings()),
    threads: TORCH_THREADS
    log:
        f"results/{RUN}/logs/train_encoder.log",
    shell:
        "{PY} -m pipeline train-encoder --json {params.cfg} --set encoder.num_workers=0 --threads {threads} "
        "--train {input.train} --test {input.test} --out {output.pt} 2>&1 | tee {log}"


rule features:
    input:
        tar=shard_tar,
        encoder=encoder_file(),
    output:
        directory(f"results/{RUN}/features/{{split}}-{{shard_id}}.zarr"),
    params:
        cfg=lambda wc: cli_json(encoder=encoder_settings(),
                                kmeans={k: config["kmeans"][k] for k in ("feature_view", "seed")}),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/features/{{split}}-{{shard_id}}.log",
    shell:
        "{PY} -m pipeline features --json {params.cfg} --json {ENCODER_RUNTIME} --threads {threads} "
        "--shard {input.tar} --encoder {input.encoder} --out {output} 2>&1 | tee {log}"


rule kmeans:
    input:
        kmeans_stores,
    output:
        centroids=f"results/{RUN}/kmeans/centroids.npy",
        meta=f"results/{RUN}/kmeans/centroids.json",
    params:
        cfg=lambda wc: cli_json(kmeans=config["kmeans"]),
        out_dir=f"results/{RUN}/kmeans",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/kmeans.log",
    shell:
        "{PY} -m pipeline kmeans --json {params.cfg} --threads {threads} --out-dir {params.out_dir} {input} "
        "2>&1 | tee {log}"


rule tokens:
    input:
        tar=shard_tar,
        encoder=encoder_file(),
        centroids=f"results/{RUN}/kmeans/centroids.npy",
    output:
        npy=f"results/{RUN}/tokens/{{split}}-{{shard_id}}.npy",
        meta=f"results/{RUN}/tokens/{{split}}-{{shard_id}}.json",
    params:
        cfg=lambda wc: cli_json(encoder=encoder_settings(), tokens=config["tokens"]),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/tokens/{{split}}-{{shard_id}}.log",
    shell:
        "{PY} -m pipeline tokens --json {params.cfg} --json {ENCODER_RUNTIME} --threads {threads} "
        "--shard {input.tar} --encoder {input.encoder} --centroids {input.centroids} --out {output.npy} "
        "2>&1 | tee {log}"
