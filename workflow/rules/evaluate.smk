# Evaluation: reference statistics of real images, FID/IS/precision-recall of both sample sets,
# the token-stability table, then metrics.json (every figure with its provenance) and report.html.

EVAL = config["evaluate"]
EVAL_RUNTIME = cli_json(evaluate={k: EVAL[k] for k in ("batch_size", "device")})
REPORT_DIR = f"reports/{RUN}"


def eval_settings(*keys):
    return {k: EVAL[k] for k in keys}


rule reference:
    input:
        lambda wc: shard_paths(EVAL["reference_split"]),
    output:
        stats=f"results/{RUN}/eval/reference/stats.npz",
        features=f"results/{RUN}/eval/reference/features.npy",
        meta=f"results/{RUN}/eval/reference/reference.json",
    params:
        cfg=lambda wc: cli_json(evaluate=eval_settings("network", "reference_split", "n_reference"),
                                encoder=view_settings()),
        out_dir=f"results/{RUN}/eval/reference",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/reference.log",
    shell:
        "{PY} -m pipeline reference --json {params.cfg} --json {EVAL_RUNTIME} --threads {threads} "
        "--shards {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule score:
    input:
        images=f"results/{RUN}/samples/{{model}}/images.npz",
        reference=f"results/{RUN}/eval/reference/reference.json",
    output:
        f"results/{RUN}/eval/{{model}}.json",
    params:
        cfg=lambda wc: cli_json(evaluate=eval_settings("network", "reference_stats", "pr_k")),
        reference=f"results/{RUN}/eval/reference",
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/score_{{model}}.log",
    shell:
        "{PY} -m pipeline score --json {params.cfg} --json {EVAL_RUNTIME} --threads {threads} "
        "--images {input.images} --reference {params.reference} --out {output} 2>&1 | tee {log}"


rule stability:
    input:
        shards=lambda wc: shard_paths(EVAL["reference_split"]),
        encoder=encoder_file(),
        centroids=f"results/{RUN}/kmeans/centroids.npy",
        vq=vq_file(),
    output:
        f"results/{RUN}/eval/stability.json",
    params:
        cfg=lambda wc: cli_json(encoder=encoder_settings(), vq=vq_settings(),
                                evaluate=eval_settings("stability_images", "stability_snrs", "seed")),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        f"results/{RUN}/logs/stability.log",
    shell:
        "{PY} -m pipeline stability --json {params.cfg} --json {ENCODER_RUNTIME} --threads {threads} "
        "--shards {input.shards} --encoder {input.encoder} --centroids {input.centroids} --vq {input.vq} "
        "--out {output} 2>&1 | tee {log}"


def report_inputs(wildcards):
    inputs = {"stability": f"results/{RUN}/eval/stability.json",
              "train_stage2": f"results/{RUN}/checkpoints/stage2/train.json"}
    for model in ("digit", "vq"):
        inputs[f"score_{model}"] = f"results/{RUN}/eval/{model}.json"
        inputs[f"samples_{model}"] = f"results/{RUN}/samples/{model}/samples.json"
        inputs[f"probe_{model}"] = f"results/{RUN}/probe/{model}.json"
        inputs[f"train_{model}"] = f"results/{RUN}/checkpoints/{model}/train.json"
    if VQ["train"] is not None:
        inputs["vq"] = f"results/{RUN}/vq/vq.json"
    if config["encoder"]["train"] is not None:
        inputs["encoder"] = f"results/{RUN}/encoder/encoder.json"
    return inputs


rule report:
    input:
        unpack(report_inputs),
        grids=[f"results/{RUN}/samples/{model}/grid.png" for model in ("digit", "vq")],
    output:
        metrics=report(f"{REPORT_DIR}/metrics.json", caption="../report/metrics.rst",
                       category="Report", labels={"file": "metrics.json"}),
        html=report(f"{REPORT_DIR}/report.html", caption="../report/report.rst",
                    category="Report", labels={"file": "report.html"}),
    params:
        cfg=lambda wc: cli_json(**config),
        inputs=lambda wc, input: " ".join(f"--input {name}={path}" for name, path in input.items()
                                          if name != "grids"),
    log:
        f"results/{RUN}/logs/report.log",
    shell:
        "{PY} -m pipeline report --json {params.cfg} {params.inputs} --metrics {output.metrics} "
        "--html {output.html} 2>&1 | tee {log}"
