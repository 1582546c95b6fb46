# Twin-Merging (Lu et al., 2024) as a rule-method: a shared merge plus SVD-compressed
# exclusive parts mixed per input by a router (src/mergescale/rule_methods/twin_merging.py). Writes a
# model-spec directory that lm-eval loads through the registered class `mergescale-twin`.
# Its params are checked when the config is loaded (mergescale.rule_methods.registry).
import mergescale.rule_methods.twin_merging as twin_merging_module


rule twin_merging:
    input:
        base="results/bases/{base}",
        experts=get_expert_dirs,
        validation=lambda wc: [f"results/data/{t}/validation.jsonl" for t in COMBOS[wc.combo]],
        code=twin_merging_module.__file__,  # editing the method re-runs only its merges
    output:
        merge_output("results/merged/{base}/{method}/{combo}"),
    log:
        "results/logs/merge/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/merge/{base}/{method}/{combo}.tsv"
    wildcard_constraints:
        method=methods_using("twin_merging"),
    params:
        params=method_params,
        tasks=lambda wc: COMBOS[wc.combo],
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
    threads: 1
    resources:
        **rule_resources("twin_merging"),
    script:
        "../../scripts/twin_merging.py"
