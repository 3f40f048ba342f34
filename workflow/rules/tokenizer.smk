# The discriminative tokenizer: encoder -> features (k-means sample shards only) -> k-means ->
# tokens (fused encode-and-assign for every shard). Per-shard rules make it incremental.

wildcard_constraints:
    split="[A-Za-z0-9_]+",
    shard_id="[0-9]{6}",


def kmeans_stores(wildcards):
    tars = shard_paths(config["kmeans"]["split"])
    if config["kmeans"]["shards"]:
        tars = tars[: config["kmeans"]["shards"]]
    return [res(f"features/{shard_name(t)}.zarr") for t in tars]


rule train_encoder:
    input:
        train=lambda wc: training_shards("encoder", TRAIN_SPLIT),
        test=lambda wc: training_shards("encoder", EVAL_SPLIT),
    output:
        pt=res("encoder/encoder.pt"),
        meta=res("encoder/encoder.json"),
    params:
        cfg=settings("train-encoder"),
    threads: TORCH_THREADS
    log:
        logfile("train_encoder"),
    shell:
        "{PY} -m pipeline train-encoder --json {params.cfg} --set encoder.num_workers=0 --threads {threads} "
        "--train {input.train} --test {input.test} --out {output.pt} 2>&1 | tee {log}"


rule features:
    input:
        tar=shard_tar,
        encoder=encoder_file(),
    output:
        directory(res("features/{split}-{shard_id}.zarr")),
    params:
        cfg=settings("features"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("features/{split}-{shard_id}"),
    shell:
        "{PY} -m pipeline features --json {params.cfg} --json {RUNTIME[features]} --threads {threads} "
        "--shard {input.tar} --encoder {input.encoder} --out {output} 2>&1 | tee {log}"


rule kmeans:
    input:
        kmeans_stores,
    output:
        centroids=res("kmeans/centroids.npy"),
        meta=res("kmeans/centroids.json"),
    params:
        cfg=settings("kmeans"),
        out_dir=res("kmeans"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("kmeans"),
    shell:
        "{PY} -m pipeline kmeans --json {params.cfg} --json {RUNTIME[kmeans]} --threads {threads} "
        "--out-dir {params.out_dir} {input} "
        "2>&1 | tee {log}"


rule tokens:
    input:
        tar=shard_tar,
        encoder=encoder_file(),
        centroids=res("kmeans/centroids.npy"),
    output:
        npy=res("tokens/{split}-{shard_id}.npy"),
        meta=res("tokens/{split}-{shard_id}.json"),
    params:
        cfg=settings("tokens"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("tokens/{split}-{shard_id}"),
    shell:
        "{PY} -m pipeline tokens --json {params.cfg} --json {RUNTIME[tokens]} --threads {threads} "
        "--shard {input.tar} --encoder {input.encoder} --centroids {input.centroids} --out {output.npy} "
        "2>&1 | tee {log}"
