# aTLAS (config key atlas): learned per-expert, per-block task-vector coefficients, and
# task arithmetic with one coefficient line-searched on the same labelled examples.
# The plan (which merges exist) is ATLAS, built in common.smk.

if ATLAS:

    import mergescale.rule_methods.atlas_plan

    ATLAS_CFG = config["atlas"]

    rule merge_atlas:
        input:
            base="results/bases/{base}",
            experts=lambda wc: [f"results/experts/{wc.base}/{t}" for t in COMBOS[wc.combo]],
            data=lambda wc: [f"results/data/{t}/validation.jsonl" for t in COMBOS[wc.combo]],
            # editing the implementation re-runs these merges
            source=package_source("mergescale.rule_methods.atlas"),
        output:
            merge_output("results/merged/{base}/{amethod}/{combo}"),
        log:
            "results/logs/merge_atlas/{base}/{amethod}/{combo}.log",
        benchmark:
            "results/benchmarks/merge_atlas/{base}/{amethod}/{combo}.tsv"
        wildcard_constraints:
            amethod="|".join(mergescale.rule_methods.atlas_plan.ATLAS_METHODS),
        params:
            settings={k: v for k, v in ATLAS_CFG.items() if k not in ("bases", "ks", "methods")},
            dtype=config["merge"]["dtype"],
            seed=config["seed"],
        threads: 1
        resources:
            **rule_resources("merge_atlas"),
        script:
            "../../scripts/atlas.py"
