# Image source -> WebDataset shards. A checkpoint: how many shards exist is known only after it ran.


checkpoint shards:
    output:
        manifest="shards/{dataset}/manifest.parquet",
        summary="shards/{dataset}/dataset.json",
    params:
        cfg=settings("shards"),
    threads: config["shards"]["workers"]
    log:
        "shards/{dataset}/shards.log",
    shell:
        "{PY} -m pipeline shards --json {params.cfg} --set shards.workers={threads} 2>&1 | tee {log}"


def shard_paths(split):
    """The tars of one split, read from the shards checkpoint's dataset.json."""
    summary = checkpoints.shards.get(dataset=DATASET).output.summary
    with open(summary) as f:
        return [f"shards/{DATASET}/{name}" for name in json.load(f)["splits"][split]["shards"]]


def shard_tar(wildcards):
    """One shard's tar, tied to the checkpoint so that a per-shard target works in a fresh directory."""
    checkpoints.shards.get(dataset=DATASET)
    return f"shards/{DATASET}/{wildcards.split}-{wildcards.shard_id}.tar"
