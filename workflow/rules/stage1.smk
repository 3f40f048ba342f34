# Stage 1: the GPT over token grids -> samples (token grids) and the linear probe. One set of rules
# serves both token kinds: {model} = digit (DiGIT tokens, the method) or vq (VQ tokens, the baseline
# with the same model size and budget: the same `train` settings). Then the MaskGIT baseline: a
# mask-predict transformer over VQ tokens (`maskgit` settings).

wildcard_constraints:
    model="|".join(MODELS),


def launcher(processes):
    """The interpreter, or torchrun with one process per GPU (single node) when processes > 1."""
    if processes <= 1:
        return PY
    return f"{PY} -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node {processes}"


TRAIN = config["train"]
# How a training job is launched and how its CPU threads are split between its processes are
# runtime choices (DDP keeps the global batch): globals in the shell command, never rule params,
# so neither `processes` nor --cores reruns a training. Threads per process: max(1, threads // N).
PROCESSES = {"train": TRAIN["processes"], "stage2": config["stage2"]["train"]["processes"],
             "stage2_nar": config["stage2_nar"]["train"]["processes"],
             "maskgit": config["maskgit"]["train"]["processes"],
             "mar": config["mar"]["train"]["processes"], "mar_causal": config["mar_causal"]["train"]["processes"]}
LAUNCH = {name: launcher(n) for name, n in PROCESSES.items()}


rule train_stage1:
    input:
        lambda wc: [f for split in TRAIN["splits"] for f in token_files(split, wc.model)],
    output:
        ckpt=res("checkpoints/{model}/final.pt"),
        summary=res("checkpoints/{model}/train.json"),
    params:
        cfg=settings("train"),
        out_dir=lambda wc: res(f"checkpoints/{wc.model}"),
    threads: TORCH_THREADS
    resources:
        gpu=TRAIN["processes"],
    log:
        logfile("train_stage1_{model}"),
    shell:
        "{LAUNCH[train]} -m pipeline train --json {params.cfg} --json {RUNTIME[train]} "
        "--threads $(( {threads} > {PROCESSES[train]} ? {threads} / {PROCESSES[train]} : 1 )) "
        "--tokens {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule sample_stage1:
    input:
        ckpt=res("checkpoints/{model}/final.pt"),
    output:
        tokens=res("samples/{model}/tokens.npy"),
        labels=res("samples/{model}/labels.npy"),
        meta=res("samples/{model}/samples.json"),
    params:
        cfg=settings("sample"),
        out_dir=lambda wc: res(f"samples/{wc.model}"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("sample_stage1_{model}"),
    shell:
        "{PY} -m pipeline sample --json {params.cfg} --json {RUNTIME[sample]} --threads {threads} "
        "--checkpoint {input.ckpt} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule probe_stage1:
    input:
        ckpt=res("checkpoints/{model}/final.pt"),
        train=lambda wc: token_files(config["probe"]["train_split"], wc.model),
        test=lambda wc: token_files(config["probe"]["test_split"], wc.model),
    output:
        res("probe/{model}.json"),
    params:
        cfg=settings("probe"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("probe_stage1_{model}"),
    shell:
        "{PY} -m pipeline probe --json {params.cfg} --json {RUNTIME[probe]} --threads {threads} "
        "--checkpoint {input.ckpt} --train {input.train} --test {input.test} --out {output} 2>&1 | tee {log}"


MASKGIT = config["maskgit"]


rule train_maskgit:
    input:
        lambda wc: [f for split in MASKGIT["train"]["splits"] for f in token_files(split, "vq")],
    output:
        ckpt=res("checkpoints/maskgit/final.pt"),
        summary=res("checkpoints/maskgit/train.json"),
    params:
        cfg=settings("train-maskgit"),
        out_dir=res("checkpoints/maskgit"),
    threads: TORCH_THREADS
    resources:
        gpu=MASKGIT["train"]["processes"],
    log:
        logfile("train_maskgit"),
    shell:
        "{LAUNCH[maskgit]} -m pipeline train --section maskgit.train --json {params.cfg} "
        "--json {RUNTIME[train-maskgit]} "
        "--threads $(( {threads} > {PROCESSES[maskgit]} ? {threads} / {PROCESSES[maskgit]} : 1 )) "
        "--tokens {input} --out-dir {params.out_dir} 2>&1 | tee {log}"


rule sample_maskgit:
    input:
        ckpt=res("checkpoints/maskgit/final.pt"),
    output:
        tokens=res("samples/maskgit/tokens.npy"),
        labels=res("samples/maskgit/labels.npy"),
        meta=res("samples/maskgit/samples.json"),
    params:
        cfg=settings("sample-maskgit"),
        out_dir=res("samples/maskgit"),
    threads: TORCH_THREADS
    resources:
        gpu=1,
    log:
        logfile("sample_maskgit"),
    shell:
        "{PY} -m pipeline sample --section maskgit.sample --json {params.cfg} --json {RUNTIME[sample-maskgit]} "
        "--threads {threads} --checkpoint {input.ckpt} --out-dir {params.out_dir} 2>&1 | tee {log}"
