# Stage 1: the GPT over token grids -> samples (token grids) and the linear probe. One set of rules
# serves both token kinds: {model} = digit (DiGIT tokens, the method) or vq (VQ tokens, the baseline
# with the same model size and budget: the same `train` settings).

wildcard_constraints:
    model="digit|vq",

TOKEN_DIRS = {"digit": "tokens", "vq": "vq_tokens"}


def token_files(split, model="digit"):
    return [f"results/{RUN}/{TOKEN_DIRS[model]}/{os.path.basename(t)[:-4]}.npy" for t in shard_paths(split)]


def trainer_settings(section):
    """Trainer settings that change the model (device and process count do not)."""
    return {k: v for k, v in section.items() if k not in ("device", "processes")}


def trainer_runtime(section):
    return {"device": section["device"], "processes": section["processes"]}


def launcher(processes):
    """The interpreter, or torchrun with one process per GPU (single node) when processes > 1."""
    if processes <= 1:
        return PY
    return f"{PY} -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node {processes}"


def per_process_threads(threads, processes):
    return max(1, threads // max(1, processes))


TRAIN = config["train"]
SAMPLE_RUNTIME = cli_json(train={"device": TRAIN["device"]})


rule train_stage1:
    input:
        lambda wc: [f for split in TRAIN["splits"] for f in token_files(split, wc.model)],
    output:
        ckpt=f"results/{RUN}/checkpoints/{{model}}/final.pt",
        summary=f"results/{RUN}/checkpoints/{{model}}/train.json",
    params:
        cfg=lambda wc: cli_json(train=trainer_settings(TRAIN)),
        runtime=cli_json(train=trainer_runtime(TRAIN)),
        out_dir=lambda wc: f"results/{RUN}/checkpoints/{wc.model}",
        launch=launcher(TRAIN["processes"]),
        threads=lambda wc, threads: per_process_threads(threads, TRAIN["processes"]),
    threads: TORCH_THREADS
    resources:
        gpu=TRAIN["processes"],
    log:
        f"results/{RUN}/logs/train_stage1_{{model}}.log",
    shell:
        "{params.launch} -m pipeline train --json {params.cfg} --json {params.runtime} --threads {params.threads} "
        "--tokens {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule sample_stage1:
    input:
        ckpt=f"results/{RUN}/checkpoints/{{model}}/final.pt",
    output:
        tokens=f"results/{RUN}/samples/{{model}}/tokens.npy",
        labels=f"results/{RUN}/samples/{{model}}/labels.npy",
        meta=f"results/{RUN}/samples/{{model}}/samples.json",
    params:
        cfg=lambda wc: cli_json(sample=config["sample"]),
        out_dir=lambda wc: f"results/{RUN}/samples/{wc.model}",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/sample_stage1_{{model}}.log",
    shell:
        "{PY} -m pipeline sample --json {params.cfg} --json {SAMPLE_RUNTIME} --threads {threads} "
        "--checkpoint {input.ckpt} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule probe_stage1:
    input:
        ckpt=f"results/{RUN}/checkpoints/{{model}}/final.pt",
        train=lambda wc: token_files(config["probe"]["train_split"], wc.model),
        test=lambda wc: token_files(config["probe"]["test_split"], wc.model),
    output:
        f"results/{RUN}/probe/{{model}}.json",
    params:
        cfg=lambda wc: cli_json(probe=config["probe"]),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/probe_stage1_{{model}}.log",
    shell:
        "{PY} -m pipeline probe --json {params.cfg} --json {SAMPLE_RUNTIME} --threads {threads} "
        "--checkpoint {input.ckpt} --train {input.train} --test {input.test} --out {output} 2>&1 | tee {log}"
