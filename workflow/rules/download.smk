# Bases and experts fetched instead of trained: a hub repository at a pinned revision or a
# local directory (mergescale.hub), and training splits of public lm-eval tasks
# (mergescale.lmeval_data). Local rules: downloads need the network, not a GPU.


rule download_base:
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/download_base/{base}.log",
    wildcard_constraints:
        base=one_of(FETCHED_BASES),
    params:
        source=lambda wc: model_ref(config["bases"][wc.base]),
    script:
        "../scripts/download.py"


rule download_expert:
    output:
        directory("results/experts/{base}/{task}"),
    log:
        "results/logs/download_expert/{base}/{task}.log",
    wildcard_constraints:
        base=one_of(FETCHED_EXPERT_BASES),
    params:
        source=lambda wc: config["bases"][wc.base]["experts"][wc.task],
    script:
        "../scripts/download.py"


rule export_lm_eval_train:
    output:
        "results/data/{task}/train.jsonl",
    log:
        "results/logs/export_lm_eval_train/{task}.log",
    wildcard_constraints:
        task=one_of([t for t, spec in LM_EVAL_TASKS.items() if "train" in spec]),
    params:
        lm_task=lambda wc: LM_EVAL_TASKS[wc.task]["train"],
    script:
        "../scripts/export_lm_eval_train.py"
