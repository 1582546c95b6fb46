rule finetune_expert:
    input:
        unpack(lambda wc: train_files([wc.task])),
        base="results/bases/{base}",
    output:
        directory("results/experts/{base}/{task}"),
    log:
        "results/logs/finetune_expert/{base}/{task}.log",
    benchmark:
        "results/benchmarks/finetune_expert/{base}/{task}.tsv"
    params:
        train=lambda wc: {"seed": config["seed"], **config["finetune"]["expert"]},
        stage="finetune_expert",
        chat_template=lambda wc: uses_chat_template(wc.base),
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/finetune.py"


rule finetune_multitask:
    input:
        unpack(lambda wc: train_files(HELD_IN)),
        base="results/bases/{base}",
    output:
        directory("results/multitask/{base}/all"),
    log:
        "results/logs/finetune_multitask/{base}/all.log",
    benchmark:
        "results/benchmarks/finetune_multitask/{base}/all.tsv"
    params:
        train=lambda wc: {"seed": config["seed"], **config["finetune"]["multitask"]},
        stage="finetune_multitask",
        chat_template=lambda wc: uses_chat_template(wc.base),
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/finetune.py"
