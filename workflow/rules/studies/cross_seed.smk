# Cross-seed merging (config key cross_seed): experts of two bases pretrained from
# different seeds, merged without alignment, with permutation weight matching, and with
# PLeaS; and loss barriers between the two bases before and after matching. The plan
# (which experts, which models are evaluated) is CROSS_SEED, built in common.smk.

if CROSS_SEED:

    rule merge_cross_seed:
        input:
            unpack(get_cross_seed_inputs),
            # editing the implementation re-runs these merges
            source=package_source("mergescale.studies.cross_seed.merge"),
        output:
            merge_output(f"results/merged/{CROSS_SEED.base_a}/cross_{{xmethod}}/{{combo}}"),
        log:
            f"results/logs/merge_cross_seed/{CROSS_SEED.base_a}/{{xmethod}}/{{combo}}.log",
        benchmark:
            f"results/benchmarks/merge_cross_seed/{CROSS_SEED.base_a}/{{xmethod}}/{{combo}}.tsv"
        wildcard_constraints:
            xmethod="|".join(CROSS_SEED.methods),
            combo="|".join(CROSS_SEED.combos),
        conda:
            SOFTWARE
        threads: 1
        resources:
            **rule_resources("merge_cross_seed"),
        params:
            max_iter=CROSS_SEED.max_iter,
            pleas=CROSS_SEED.pleas,
            dtype=config["merge"]["dtype"],
            seed=config["seed"],
        script:
            "../../scripts/weight_matching.py"

    rule measure_barrier:
        input:
            base_a=f"results/bases/{CROSS_SEED.base_a}",
            base_b=f"results/bases/{CROSS_SEED.base_b}",
            experts_a=[f"results/experts/{CROSS_SEED.base_a}/{t}" for t in CROSS_SEED.expert_pairs],
            experts_b=[f"results/experts/{CROSS_SEED.base_b}/{t}" for t in CROSS_SEED.expert_pairs],
            data=[f"results/data/{t}/validation.jsonl" for t in ALL_TASKS],
            tasks=[f"results/tasks/{t}_validation.yaml" for t in CROSS_SEED.score_tasks + CROSS_SEED.expert_pairs],
        output:
            curves=report("results/tables/barrier.csv", caption="../../report/barrier.rst", category="Tables"),
            heights="results/tables/barrier_heights.csv",
        log:
            "results/logs/measure_barrier.log",
        benchmark:
            "results/benchmarks/measure_barrier.tsv"
        conda:
            SOFTWARE
        threads: 1
        resources:
            **rule_resources("measure_barrier"),
        params:
            expert_tasks=CROSS_SEED.expert_pairs,
            score_tasks=CROSS_SEED.score_tasks,
            barrier=CROSS_SEED.barrier,
            max_iter=CROSS_SEED.max_iter,
            batch_size=config["evaluate"]["batch_size"],
            seed=config["seed"],
        script:
            "../../scripts/barrier.py"

    rule plot_barrier:
        input:
            curves="results/tables/barrier.csv",
        output:
            report("results/plots/barrier.png", caption="../../report/barrier.rst", category="Figures"),
        log:
            "results/logs/plot_barrier.log",
        localrule: True
        conda:
            SOFTWARE
        script:
            "../../scripts/plot_barrier.py"
