# Pixels: the VQ tokenizer (trained here for the tiny demo, a local taming checkpoint otherwise),
# VQ tokens for the same crops as the DiGIT tokens, stage 2 (DiGIT tokens -> VQ tokens: the AR GPT
# and the NAR mask-predict model), and the rendering of every sample set into images: the DiGIT
# samples through each stage 2 (samples/digit, samples/digit_nar), the VQ-token generators (VQ GPT,
# MaskGIT) directly.

STAGE2 = config["stage2"]
STAGE2_NAR = config["stage2_nar"]

wildcard_constraints:
    vqgen="vq|maskgit",


rule train_vq:
    input:
        train=lambda wc: training_shards("vq", TRAIN_SPLIT),
        test=lambda wc: training_shards("vq", EVAL_SPLIT),
    output:
        pt=res("vq/vq.pt"),
        meta=res("vq/vq.json"),
    params:
        cfg=settings("train-vq"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("train_vq"),
    shell:
        "{PY} -m pipeline train-vq --json {params.cfg} --threads {threads} "
        "--train {input.train} --test {input.test} --out {output.pt} 2>&1 | tee {log}"


rule vq_tokens:
    input:
        tar=shard_tar,
        digit=res("tokens/{split}-{shard_id}.json"),
        vq=vq_file(),
    output:
        npy=res("vq_tokens/{split}-{shard_id}.npy"),
        meta=res("vq_tokens/{split}-{shard_id}.json"),
    params:
        cfg=settings("vq-tokens"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("vq_tokens/{split}-{shard_id}"),
    shell:
        "{PY} -m pipeline vq-tokens --json {params.cfg} --json {RUNTIME[vq-tokens]} --threads {threads} "
        "--shard {input.tar} --digit-tokens {input.digit} --vq {input.vq} --out {output.npy} 2>&1 | tee {log}"


rule train_stage2:
    input:
        vq=lambda wc: [f for split in STAGE2["train"]["splits"] for f in token_files(split, "vq")],
        digit=lambda wc: [f for split in STAGE2["train"]["splits"] for f in token_files(split, "digit")],
    output:
        ckpt=res("checkpoints/stage2/final.pt"),
        summary=res("checkpoints/stage2/train.json"),
    params:
        cfg=settings("train-stage2"),
        out_dir=res("checkpoints/stage2"),
    threads: TORCH_THREADS
    resources:
        gpu=STAGE2["train"]["processes"],
    log:
        logfile("train_stage2"),
    shell:
        "{LAUNCH[stage2]} -m pipeline train --json {params.cfg} --json {RUNTIME[train-stage2]} "
        "--threads $(( {threads} > {PROCESSES[stage2]} ? {threads} / {PROCESSES[stage2]} : 1 )) "
        "--tokens {input.vq} --context {input.digit} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule train_stage2_nar:
    input:
        vq=lambda wc: [f for split in STAGE2_NAR["train"]["splits"] for f in token_files(split, "vq")],
        digit=lambda wc: [f for split in STAGE2_NAR["train"]["splits"] for f in token_files(split, "digit")],
    output:
        ckpt=res("checkpoints/stage2_nar/final.pt"),
        summary=res("checkpoints/stage2_nar/train.json"),
    params:
        cfg=settings("train-stage2-nar"),
        out_dir=res("checkpoints/stage2_nar"),
    threads: TORCH_THREADS
    resources:
        gpu=STAGE2_NAR["train"]["processes"],
    log:
        logfile("train_stage2_nar"),
    shell:
        "{LAUNCH[stage2_nar]} -m pipeline train --section stage2_nar.train --json {params.cfg} "
        "--json {RUNTIME[train-stage2-nar]} "
        "--threads $(( {threads} > {PROCESSES[stage2_nar]} ? {threads} / {PROCESSES[stage2_nar]} : 1 )) "
        "--tokens {input.vq} --context {input.digit} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule render_digit:
    input:
        samples=res("samples/digit/samples.json"),
        stage2=res("checkpoints/stage2/final.pt"),
        vq=vq_file(),
    output:
        images=res("samples/digit/images.npz"),
        grid=report(res("samples/digit/grid.png"), caption="../report/samples.rst",
                    category="Samples", subcategory="DiGIT", labels={"model": "DiGIT"}),
        meta=res("samples/digit/images.json"),
    params:
        cfg=settings("render"),
        samples=res("samples/digit"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("render_digit"),
    shell:
        "{PY} -m pipeline render --json {params.cfg} --json {RUNTIME[render]} --threads {threads} "
        "--samples {params.samples} --stage2 {input.stage2} --vq {input.vq} 2>&1 | tee {log}"


rule render_digit_nar:
    input:
        samples=res("samples/digit/samples.json"),
        stage2=res("checkpoints/stage2_nar/final.pt"),
        vq=vq_file(),
    output:
        images=res("samples/digit_nar/images.npz"),
        grid=report(res("samples/digit_nar/grid.png"), caption="../report/samples.rst",
                    category="Samples", subcategory="DiGIT + NAR stage 2", labels={"model": "DiGIT + NAR stage 2"}),
        meta=res("samples/digit_nar/images.json"),
    params:
        cfg=settings("render-nar"),
        samples=res("samples/digit"),
        out_dir=res("samples/digit_nar"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("render_digit_nar"),
    shell:
        "{PY} -m pipeline render --section stage2_nar.sample --json {params.cfg} --json {RUNTIME[render-nar]} "
        "--threads {threads} --samples {params.samples} --stage2 {input.stage2} --vq {input.vq} "
        "--out-dir {params.out_dir} 2>&1 | tee {log}"


rule render_vq:
    input:
        samples=res("samples/{vqgen}/samples.json"),
        vq=vq_file(),
    output:
        images=res("samples/{vqgen}/images.npz"),
        grid=report(res("samples/{vqgen}/grid.png"), caption="../report/samples.rst", category="Samples",
                    subcategory="{vqgen} (VQ tokens)", labels={"model": "{vqgen} (VQ tokens)"}),
        meta=res("samples/{vqgen}/images.json"),
    params:
        cfg=settings("render-vq"),
        samples=lambda wc: res(f"samples/{wc.vqgen}"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("render_{vqgen}"),
    shell:
        "{PY} -m pipeline render --json {params.cfg} --json {RUNTIME[render-vq]} --threads {threads} "
        "--samples {params.samples} --vq {input.vq} 2>&1 | tee {log}"
