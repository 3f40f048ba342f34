# Stage 1: the GPT over DiGIT token grids -> samples (token grids) and the linear probe.


def token_files(split):
    return [f"results/{RUN}/tokens/{os.path.basename(t)[:-4]}.npy" for t in shard_paths(split)]


def train_token_files(wildcards):
    return [f for split in config["train"]["splits"] for f in token_files(split)]


TRAIN_RUNTIME = cli_json(train={"device": config["train"]["device"]})


rule train_stage1:
    input:
        train_token_files,
    output:
        ckpt=f"results/{RUN}/checkpoints/digit/final.pt",
        summary=f"results/{RUN}/checkpoints/digit/train.json",
    params:
        cfg=lambda wc: cli_json(train={k: v for k, v in config["train"].items() if k != "device"}),
        out_dir=f"results/{RUN}/checkpoints/digit",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/train_stage1.log",
    shell:
        "{PY} -m pipeline train --json {params.cfg} --json {TRAIN_RUNTIME} --threads {threads} "
        "--tokens {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule sample_stage1:
    input:
        ckpt=f"results/{RUN}/checkpoints/digit/final.pt",
    output:
        tokens=f"results/{RUN}/samples/digit/tokens.npy",
        labels=f"results/{RUN}/samples/digit/labels.npy",
        meta=f"results/{RUN}/samples/digit/samples.json",
    params:
        cfg=lambda wc: cli_json(sample=config["sample"]),
        out_dir=f"results/{RUN}/samples/digit",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/sample_stage1.log",
    shell:
        "{PY} -m pipeline sample --json {params.cfg} --json {TRAIN_RUNTIME} --threads {threads} "
        "--checkpoint {input.ckpt} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule probe_stage1:
    input:
        ckpt=f"results/{RUN}/checkpoints/digit/final.pt",
        train=lambda wc: token_files(config["probe"]["train_split"]),
        test=lambda wc: token_files(config["probe"]["test_split"]),
    output:
        f"results/{RUN}/probe/digit.json",
    params:
        cfg=lambda wc: cli_json(probe=config["probe"]),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/probe_stage1.log",
    shell:
        "{PY} -m pipeline probe --json {params.cfg} --json {TRAIN_RUNTIME} --threads {threads} "
        "--checkpoint {input.ckpt} --train {input.train} --test {input.test} --out {output} 2>&1 | tee {log}"
