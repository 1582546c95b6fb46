rule evaluate:
    input:
        model="results/{model}",
        tasks=get_eval_task_yamls,
    output:
        "results/evals/{model}/scores.json",
    log:
        "results/logs/evaluate/{model}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}.tsv"
    wildcard_constraints:
        model=r"(bases|experts|multitask|merged)/[^/]+(/[^/]+){0,2}",
    params:
        tasks=[[t, s] for t in ALL_TASKS for s in EVAL_SPLITS],
        backend=config["evaluate"]["backend"],
        batch_size=config["evaluate"]["batch_size"],
        limit=config["evaluate"]["limit"],
        seed=config["seed"],
        chat_template=lambda wc: uses_chat_template(wc.model.split("/")[1]),
    threads: 1
    resources:
        mem_mb=3000,
    script:
        "../scripts/evaluate.py"
