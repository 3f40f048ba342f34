# Pixels: the VQ tokenizer (trained here for the tiny demo, a local taming checkpoint otherwise),
# VQ tokens for the same crops as the DiGIT tokens, stage 2 (DiGIT tokens -> VQ tokens), and the
# rendering of both sample sets (DiGIT through stage 2; the VQ baseline directly) into images.

VQ = config["vq"]
STAGE2 = config["stage2"]
VQ_RUNTIME = cli_json(vq={k: VQ[k] for k in ("batch_size", "device")})
RENDER_RUNTIME = cli_json(stage2={"train": {"device": STAGE2["train"]["device"]}})


def vq_settings():
    """VQ settings that change its tokens (batch size and device do not)."""
    return {k: v for k, v in VQ.items() if k not in ("batch_size", "device")}


def vq_file():
    if VQ["train"] is not None:
        return f"results/{RUN}/vq/vq.pt"
    if VQ["checkpoint"] is None:
        raise WorkflowError("config key 'vq.checkpoint' is null and 'vq.train' is not set: point vq.checkpoint at "
                            "a local taming-format VQGAN (MAGE's VQGAN for the paper) or set vq.train (tiny demo)")
    return VQ["checkpoint"]


def vq_train_shards(split):
    tars = shard_paths(split)
    limit = VQ["train"]["max_shards"] if VQ["train"] else None
    return tars[:limit] if limit else tars


rule train_vq:
    input:
        train=lambda wc: vq_train_shards("train"),
        test=lambda wc: vq_train_shards(config["dataset"]["splits"][-1]),
    output:
        pt=f"results/{RUN}/vq/vq.pt",
        meta=f"results/{RUN}/vq/vq.json",
    params:
        cfg=lambda wc: cli_json(vq=vq_settings(), encoder=view_settings()),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/train_vq.log",
    shell:
        "{PY} -m pipeline train-vq --json {params.cfg} --threads {threads} "
        "--train {input.train} --test {input.test} --out {output.pt} 2>&1 | tee {log}"


rule vq_tokens:
    input:
        tar=shard_tar,
        digit=f"results/{RUN}/tokens/{{split}}-{{shard_id}}.json",
        vq=vq_file(),
    output:
        npy=f"results/{RUN}/vq_tokens/{{split}}-{{shard_id}}.npy",
        meta=f"results/{RUN}/vq_tokens/{{split}}-{{shard_id}}.json",
    params:
        cfg=lambda wc: cli_json(vq=vq_settings(), encoder=view_settings()),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/vq_tokens/{{split}}-{{shard_id}}.log",
    shell:
        "{PY} -m pipeline vq-tokens --json {params.cfg} --json {VQ_RUNTIME} --threads {threads} "
        "--shard {input.tar} --digit-tokens {input.digit} --vq {input.vq} --out {output.npy} 2>&1 | tee {log}"


rule train_stage2:
    input:
        vq=lambda wc: [f for split in STAGE2["train"]["splits"] for f in token_files(split, "vq")],
        digit=lambda wc: [f for split in STAGE2["train"]["splits"] for f in token_files(split, "digit")],
    output:
        ckpt=f"results/{RUN}/checkpoints/stage2/final.pt",
        summary=f"results/{RUN}/checkpoints/stage2/train.json",
    params:
        cfg=lambda wc: cli_json(stage2={"train": trainer_settings(STAGE2["train"])}),
        runtime=cli_json(stage2={"train": trainer_runtime(STAGE2["train"])}),
        out_dir=f"results/{RUN}/checkpoints/stage2",
        launch=launcher(STAGE2["train"]["processes"]),
        threads=lambda wc, threads: per_process_threads(threads, STAGE2["train"]["processes"]),
    threads: TORCH_THREADS
    resources:
        gpu=STAGE2["train"]["processes"],
    log:
        f"results/{RUN}/logs/train_stage2.log",
    shell:
        "{params.launch} -m pipeline train --json {params.cfg} --json {params.runtime} --threads {params.threads} "
        "--tokens {input.vq} --context {input.digit} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule render_digit:
    input:
        samples=f"results/{RUN}/samples/digit/samples.json",
        stage2=f"results/{RUN}/checkpoints/stage2/final.pt",
        vq=vq_file(),
    output:
        images=f"results/{RUN}/samples/digit/images.npz",
        grid=report(f"results/{RUN}/samples/digit/grid.png", caption="../report/samples.rst",
                    category="Samples", subcategory="DiGIT", labels={"model": "DiGIT"}),
        meta=f"results/{RUN}/samples/digit/images.json",
    params:
        cfg=lambda wc: cli_json(stage2={"sample": STAGE2["sample"]}, vq=vq_settings()),
        samples=f"results/{RUN}/samples/digit",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/render_digit.log",
    shell:
        "{PY} -m pipeline render --json {params.cfg} --json {RENDER_RUNTIME} --threads {threads} "
        "--samples {params.samples} --stage2 {input.stage2} --vq {input.vq} 2>&1 | tee {log}"


rule render_vq:
    input:
        samples=f"results/{RUN}/samples/vq/samples.json",
        vq=vq_file(),
    output:
        images=f"results/{RUN}/samples/vq/images.npz",
        grid=report(f"results/{RUN}/samples/vq/grid.png", caption="../report/samples.rst",
                    category="Samples", subcategory="VQ baseline", labels={"model": "VQ baseline"}),
        meta=f"results/{RUN}/samples/vq/images.json",
    params:
        cfg=lambda wc: cli_json(vq=vq_settings()),
        samples=f"results/{RUN}/samples/vq",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/render_vq.log",
    shell:
        "{PY} -m pipeline render --json {params.cfg} --json {RENDER_RUNTIME} --threads {threads} "
        "--samples {params.samples} --vq {input.vq} 2>&1 | tee {log}"
