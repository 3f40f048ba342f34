# Evaluation: reference statistics of real images, FID/IS/precision-recall of both sample sets,
# the token-stability table, then metrics.json (every figure with its provenance) and report.html.

EVAL = config["evaluate"]
REPORT_DIR = f"reports/{RUN}"


rule reference:
    input:
        lambda wc: shard_paths(EVAL["reference_split"]),
    output:
        stats=res("eval/reference/stats.npz"),
        features=res("eval/reference/features.npy"),
        meta=res("eval/reference/reference.json"),
    params:
        cfg=settings("reference"),
        out_dir=res("eval/reference"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("reference"),
    shell:
        "{PY} -m pipeline reference --json {params.cfg} --json {RUNTIME[reference]} --threads {threads} "
        "--shards {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


wildcard_constraints:
    row="|".join(ROWS),


rule score:
    input:
        images=res("samples/{row}/images.npz"),
        reference=res("eval/reference/reference.json"),
    output:
        res("eval/{row}.json"),
    params:
        cfg=settings("score"),
        reference=res("eval/reference"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("score_{row}"),
    shell:
        "{PY} -m pipeline score --json {params.cfg} --json {RUNTIME[score]} --threads {threads} "
        "--images {input.images} --reference {params.reference} --out {output} 2>&1 | tee {log}"


rule stability:
    input:
        shards=lambda wc: shard_paths(EVAL["reference_split"]),
        encoder=encoder_file(),
        centroids=res("kmeans/centroids.npy"),
        vq=vq_file(),
    output:
        res("eval/stability.json"),
    params:
        cfg=settings("stability"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("stability"),
    shell:
        "{PY} -m pipeline stability --json {params.cfg} --json {RUNTIME[stability]} --threads {threads} "
        "--shards {input.shards} --encoder {input.encoder} --centroids {input.centroids} --vq {input.vq} "
        "--out {output} 2>&1 | tee {log}"


def report_inputs(wildcards):
    inputs = {"stability": res("eval/stability.json")}
    for model in MODELS:
        inputs[f"probe_{model}"] = res(f"probe/{model}.json")
    for row in GENERATORS:
        inputs[f"score_{row}"] = res(f"eval/{row}.json")
        inputs[f"samples_{row}"] = res(f"samples/{ROW_SAMPLES[row]}/samples.json")
    for name in trained_generators():
        inputs[f"train_{name}"] = res(f"checkpoints/{name}/train.json")
    if config["vq"]["train"] is not None:
        inputs["vq"] = res("vq/vq.json")
    if latent_rows() and config["kl"]["train"] is not None:
        inputs["kl"] = res("kl/kl.json")
    if config["encoder"]["train"] is not None:
        inputs["encoder"] = res("encoder/encoder.json")
    return inputs


rule report:
    input:
        unpack(report_inputs),
        grids=[res(f"samples/{row}/grid.png") for row in GENERATORS],
    output:
        metrics=report(f"{REPORT_DIR}/metrics.json", caption="../report/metrics.rst",
                       category="Report", labels={"file": "metrics.json"}),
        html=report(f"{REPORT_DIR}/report.html", caption="../report/report.rst",
                    category="Report", labels={"file": "report.html"}),
    params:
        cfg=settings("report"),
        inputs=lambda wc, input: " ".join(f"--input {name}={path}" for name, path in input.items()
                                          if name != "grids"),
    log:
        logfile("report"),
    shell:
        "{PY} -m pipeline report --json {params.cfg} --json {RUNTIME[report]} {params.inputs} "
        "--metrics {output.metrics} "
        "--html {output.html} 2>&1 | tee {log}"
