# MAR's continuous tokens: the KL autoencoder (trained here for the tiny demo, MAR's kl16.ckpt
# otherwise), KL posterior latents for the same crops as the DiGIT tokens (one shard each), then
# MAR (masked, random order) and its causal variant (mar_causal) trained on them
# with the diffusion loss, sampled, and decoded by the KL decoder.

wildcard_constraints:
    latgen="mar|mar_causal",

rule train_kl:
    input:
        train=lambda wc: training_shards("kl", TRAIN_SPLIT),
        test=lambda wc: training_shards("kl", EVAL_SPLIT),
    output:
        pt=res("kl/kl.pt"),
        meta=res("kl/kl.json"),
    params:
        cfg=settings("train-kl"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("train_kl"),
    shell:
        "{PY} -m pipeline train-kl --json {params.cfg} --threads {threads} "
        "--train {input.train} --test {input.test} --out {output.pt} 2>&1 | tee {log}"


rule kl_latents:
    input:
        tar=shard_tar,
        digit=res("tokens/{split}-{shard_id}.json"),
        kl=lambda wc: kl_file(),
    output:
        npy=res("kl_latents/{split}-{shard_id}.npy"),
        meta=res("kl_latents/{split}-{shard_id}.json"),
    params:
        cfg=settings("kl-latents"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("kl_latents/{split}-{shard_id}"),
    shell:
        "{PY} -m pipeline kl-latents --json {params.cfg} --json {RUNTIME[kl-latents]} --threads {threads} "
        "--shard {input.tar} --digit-tokens {input.digit} --kl {input.kl} --out {output.npy} 2>&1 | tee {log}"


rule train_mar:
    input:
        lambda wc: [f for split in config["mar"]["train"]["splits"] for f in token_files(split, "kl")],
    output:
        ckpt=res("checkpoints/mar/final.pt"),
        summary=res("checkpoints/mar/train.json"),
    params:
        cfg=settings("train-mar"),
        out_dir=res("checkpoints/mar"),
    threads: TORCH_THREADS
    resources:
        gpu=config["mar"]["train"]["processes"],
    log:
        logfile("train_mar"),
    shell:
        "{LAUNCH[mar]} -m pipeline train --section mar.train --json {params.cfg} "
        "--json {RUNTIME[train-mar]} "
        "--threads $(( {threads} > {PROCESSES[mar]} ? {threads} / {PROCESSES[mar]} : 1 )) "
        "--tokens {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule sample_mar:
    input:
        ckpt=res("checkpoints/mar/final.pt"),
    output:
        latents=res("samples/mar/latents.npy"),
        labels=res("samples/mar/labels.npy"),
        meta=res("samples/mar/samples.json"),
    params:
        cfg=settings("sample-mar"),
        out_dir=res("samples/mar"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("sample_mar"),
    shell:
        "{PY} -m pipeline sample --section mar.sample --json {params.cfg} --json {RUNTIME[sample-mar]} "
        "--threads {threads} --checkpoint {input.ckpt} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule train_mar_causal:
    input:
        lambda wc: [f for split in config["mar_causal"]["train"]["splits"] for f in token_files(split, "kl")],
    output:
        ckpt=res("checkpoints/mar_causal/final.pt"),
        summary=res("checkpoints/mar_causal/train.json"),
    params:
        cfg=settings("train-mar-causal"),
        out_dir=res("checkpoints/mar_causal"),
    threads: TORCH_THREADS
    resources:
        gpu=config["mar_causal"]["train"]["processes"],
    log:
        logfile("train_mar_causal"),
    shell:
        "{LAUNCH[mar_causal]} -m pipeline train --section mar_causal.train --json {params.cfg} "
        "--json {RUNTIME[train-mar-causal]} "
        "--threads $(( {threads} > {PROCESSES[mar_causal]} ? {threads} / {PROCESSES[mar_causal]} : 1 )) "
        "--tokens {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule sample_mar_causal:
    input:
        ckpt=res("checkpoints/mar_causal/final.pt"),
    output:
        latents=res("samples/mar_causal/latents.npy"),
        labels=res("samples/mar_causal/labels.npy"),
        meta=res("samples/mar_causal/samples.json"),
    params:
        cfg=settings("sample-mar-causal"),
        out_dir=res("samples/mar_causal"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("sample_mar_causal"),
    shell:
        "{PY} -m pipeline sample --section mar_causal.sample --json {params.cfg} --json {RUNTIME[sample-mar-causal]} "
        "--threads {threads} --checkpoint {input.ckpt} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule render_latent:
    input:
        samples=res("samples/{latgen}/samples.json"),
        kl=lambda wc: kl_file(),
    output:
        images=res("samples/{latgen}/images.npz"),
        grid=report(res("samples/{latgen}/grid.png"), caption="../report/samples.rst", category="Samples",
                    subcategory="{latgen} (KL latents)", labels={"model": "{latgen} (KL latents)"}),
        meta=res("samples/{latgen}/images.json"),
    params:
        cfg=settings("render-latents"),
        samples=lambda wc: res(f"samples/{wc.latgen}"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("render_{latgen}"),
    shell:
        "{PY} -m pipeline render-latents --json {params.cfg} --json {RUNTIME[render-latents]} --threads {threads} "
        "--samples {params.samples} --kl {input.kl} 2>&1 | tee {log}"
