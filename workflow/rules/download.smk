# Bases and experts fetched instead of trained: a hub repository at a pinned revision or a
# local directory (mergescale.sources.hub), and training splits of public lm-eval tasks
# and validation rows (mergescale.tasks.lmeval_data). Local rules: downloads need the network, not a GPU.


rule download_base:
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/download_base/{base}.log",
    wildcard_constraints:
        base=one_of(FETCHED_BASES),
    conda:
        SOFTWARE
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
    conda:
        SOFTWARE
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
        task=one_of([t for t in LM_EVAL_TASKS if lm_eval_split_tasks(LM_EVAL_TASKS[t], "train")]),
    conda:
        SOFTWARE
    params:
        lm_tasks=lambda wc: lm_eval_split_tasks(LM_EVAL_TASKS[wc.task], "train"),
        split="train",
    script:
        "../scripts/export_lm_eval_split.py"


# Validation rows (statistics, fits, tuning): the lm-eval task's own validation split where
# it is not scored on, else a held-back slice of its training split (mergescale.tasks.lmeval_data).
rule export_lm_eval_validation:
    output:
        "results/data/{task}/validation.jsonl",
    log:
        "results/logs/export_lm_eval_validation/{task}.log",
    wildcard_constraints:
        task=one_of([t for t in LM_EVAL_TASKS if lm_eval_split_tasks(LM_EVAL_TASKS[t], "validation")]),
    conda:
        SOFTWARE
    params:
        lm_tasks=lambda wc: lm_eval_split_tasks(LM_EVAL_TASKS[wc.task], "validation"),
        split="validation",
    script:
        "../scripts/export_lm_eval_split.py"


# The validation rows as an lm-eval task (tuning and MAP score candidates on it).
rule render_lm_eval_validation:
    input:
        "results/data/{task}/validation.jsonl",
    output:
        "results/tasks/{task}_validation.yaml",
    log:
        "results/logs/render_task/{task}_validation.log",
    wildcard_constraints:
        task=one_of([t for t in LM_EVAL_TASKS if lm_eval_split_tasks(LM_EVAL_TASKS[t], "validation")]),
    conda:
        SOFTWARE
    params:
        description=lambda wc: f"validation rows of {'+'.join(lm_eval_split_tasks(LM_EVAL_TASKS[wc.task], 'validation'))}",
        cluster=lambda wc: LM_EVAL_TASKS[wc.task].get("cluster", wc.task),
    script:
        "../scripts/render_task.py"
