rule merge:
    input:
        unpack(get_merge_data_inputs),
        base="results/bases/{base}",
        experts=get_expert_dirs,
        method_source=get_method_source,
        tuning=get_tuning_record,
    output:
        merge_output("results/merged/{base}/{method}/{combo}"),
    log:
        "results/logs/merge/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/merge/{base}/{method}/{combo}.tsv"
    wildcard_constraints:
        method=engine_methods(),  # rule-methods write their own outputs
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("merge", merge_rule_work),
    params:
        method=lambda wc: METHODS[wc.method]["method"],
        params=lambda wc: METHODS[wc.method].get("params", {}),
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
    script:
        "../scripts/merge.py"


# Validation-split hyperparameter search for methods with `tune:` in the config.
rule tune:
    input:
        base="results/bases/{base}",
        experts=get_expert_dirs,
        method_source=get_method_source,
        tasks=get_validation_task_yamls,
    output:
        "results/tuning/{base}/{method}/{combo}.json",
    log:
        "results/logs/tune/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/tune/{base}/{method}/{combo}.tsv"
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("tune"),
    params:
        method=lambda wc: METHODS[wc.method]["method"],
        tune=lambda wc: METHODS[wc.method]["tune"],
        fixed=lambda wc: METHODS[wc.method].get("params", {}),
        tasks=lambda wc: COMBOS[wc.combo],
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
        batch_size=config["evaluate"]["batch_size"],
        limit=config["evaluate"]["limit"],
    script:
        "../scripts/tune.py"


# Any rule-method (mergescale.rule_methods.registry) without a rule of its own: its
# registered run() with the entry's params and the inputs the method says it needs.
rule merge_rule_method:
    input:
        unpack(get_rule_method_inputs),
    output:
        model=merge_output("results/merged/{base}/{method}/{combo}"),
    log:
        "results/logs/merge_rule_method/{method}/{base}/{combo}.log",
    benchmark:
        "results/benchmarks/merge_rule_method/{method}/{base}/{combo}.tsv"
    wildcard_constraints:
        method=generic_rule_methods(),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("merge_rule_method", rule_method_work),
    params:
        rule=rule_method_name,
        params=method_params,
        tasks=subset_tasks,
        evaluate=EVALUATE_SETTINGS,
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
    script:
        "../scripts/merge_rule_method.py"
