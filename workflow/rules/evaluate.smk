# Models of a batch (common.smk, eval_batches) are scored by evaluate_batch below.
EVAL_BATCHES = eval_batches()
BATCHED_MODELS = [m for paths in EVAL_BATCHES.values() for m in paths]


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
        model=r"(bases|experts|multitask|merged|ensembles)/[^/]+(/[^/]+){0,2}|sparse/[^/]+/[^/]+/c\d+/[^/]+",
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("evaluate", evaluate_work),
    params:
        **evaluate_params(),
        chat_template=lambda wc: uses_chat_template(wc.model.split("/")[1]),
    script:
        "../scripts/evaluate.py"


# Several checkpoints of one architecture scored in one process (one lm-eval start-up,
# weights swapped in): a fraction of the time of one job per model for small models.
# The batch writes one JSON of every member's result; unbatch_scores (a light shell
# command per model) splits it into the scores.json files rule evaluate would write.
BATCH_OF = {m: group for group, paths in EVAL_BATCHES.items() for m in paths}


rule evaluate_batch:
    input:
        models=lambda wc: [f"results/{m}" for m in EVAL_BATCHES[wc.group]],
        tasks=get_eval_task_yamls,
    output:
        "results/evals/batches/{group}.json",
    log:
        "results/logs/evaluate_batch/{group}.log",
    benchmark:
        "results/benchmarks/evaluate_batch/{group}.tsv"
    wildcard_constraints:
        group=one_of(list(EVAL_BATCHES)),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("evaluate_batch"),
    params:
        **evaluate_params(),
        chat_template=False,  # batches hold no chat models (eval_batches)
    script:
        "../scripts/evaluate_batch.py"


# a model of a batch gets its scores from the batch, not from a job of its own
ruleorder: unbatch_scores > evaluate


rule unbatch_scores:
    input:
        lambda wc: f"results/evals/batches/{BATCH_OF[wc.model]}.json",
    output:
        "results/evals/{model}/scores.json",
    log:
        "results/logs/unbatch_scores/{model}.log",
    wildcard_constraints:
        model=one_of(BATCHED_MODELS),
    # a shell command: a Python rule (run:) would parse the whole workflow again per model
    conda:
        SOFTWARE
    params:
        model_dir="results/{model}",
        python=sys.executable,
        src=str(Path(workflow.basedir).parent / "src"),  # this workflow's package, as in common.smk
    shell:
        "PYTHONPATH={params.src}${{PYTHONPATH:+:$PYTHONPATH}} "
        "{params.python} -m mergescale.evaluate.batch_member {input} {params.model_dir} {output} > {log} 2>&1"


# The output-ensemble reference: a model spec naming the subset's experts, evaluated by
# mergescale.evaluate.ensemble's lm-eval class (no weights are written).
rule build_ensemble:
    input:
        experts=get_expert_dirs,
    output:
        directory("results/ensembles/{base}/{combo}"),
    log:
        "results/logs/build_ensemble/{base}/{combo}.log",
    conda:
        SOFTWARE
    script:
        "../scripts/ensemble.py"
