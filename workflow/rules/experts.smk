rule finetune_expert:
    input:
        unpack(lambda wc: train_files([wc.task])),
        unpack(lambda wc: replay_files(expert_train_config(wc.base))),
        base="results/bases/{base}",
    output:
        directory("results/experts/{base}/{task}"),
    log:
        "results/logs/finetune_expert/{base}/{task}.log",
    benchmark:
        "results/benchmarks/finetune_expert/{base}/{task}.tsv"
    wildcard_constraints:
        base=one_of([b for b in BASES if b not in FETCHED_EXPERT_BASES]),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("finetune_expert"),
    params:
        train=lambda wc: expert_train_config(wc.base),
        stage="finetune_expert",
        chat_template=lambda wc: uses_chat_template(wc.base),
    script:
        "../scripts/finetune.py"


rule finetune_multitask:
    input:
        unpack(lambda wc: train_files(multitask_tasks(wc.taskset))),
        unpack(lambda wc: replay_files(multitask_train_config(wc.base, wc.taskset))),
        base="results/bases/{base}",
    output:
        directory("results/multitask/{base}/{taskset}"),
    log:
        "results/logs/finetune_multitask/{base}/{taskset}.log",
    benchmark:
        "results/benchmarks/finetune_multitask/{base}/{taskset}.tsv"
    wildcard_constraints:
        taskset=rf"{ALL_HELD_IN}|k\d+s\d+",
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("finetune_multitask"),
    params:
        train=lambda wc: multitask_train_config(wc.base, wc.taskset),
        stage="finetune_multitask",
        chat_template=lambda wc: uses_chat_template(wc.base),
    script:
        "../scripts/finetune.py"
