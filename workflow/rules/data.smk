rule make_task_data:
    output:
        expand("results/data/{{task}}/{split}.jsonl", split=SPLITS),
    log:
        "results/logs/make_task_data/{task}.log",
    wildcard_constraints:
        task=one_of(DATA_TASKS),
    conda:
        SOFTWARE
    params:
        sizes=lambda wc: config["data"]["sizes"],  # data is optional (lm-eval tasks only)
        seed=config["seed"],
    script:
        "../scripts/make_task_data.py"


rule render_task:
    input:
        "results/data/{task}/{split}.jsonl",
    output:
        "results/tasks/{task}_{split}.yaml",
    log:
        "results/logs/render_task/{task}_{split}.log",
    wildcard_constraints:
        task=one_of(PROCEDURAL_TASKS),
    conda:
        SOFTWARE
    script:
        "../scripts/render_task.py"
