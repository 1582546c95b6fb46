# Sparse Model Soups (config key sparse_soups; src/mergescale/studies/sparse_soups/cycle.py): per
# (base, task, cycle), prune the start model (the expert, then the previous soup), retrain
# copies under the shared mask, average them. The soup and the best copy are evaluated
# like every model (model_dirs in common.smk); the plan is SPARSE_SOUPS.

if SPARSE_SOUPS:

    rule run_sparse_soup_cycle:
        input:
            start=lambda wc: SPARSE_SOUPS.start_dir(wc.base, wc.task, int(wc.cycle)),
            train="results/data/{task}/train.jsonl",
            validation="results/data/{task}/validation.jsonl",
            tasks="results/tasks/{task}_test.yaml",  # the copies are scored in the job
            # editing the implementation re-runs the cycles
            source=package_source("mergescale.studies.sparse_soups.cycle"),
        output:
            soup=directory("results/sparse/{base}/{task}/c{cycle}/soup"),
            best_copy=directory("results/sparse/{base}/{task}/c{cycle}/best_copy"),
            card="results/sparse/{base}/{task}/c{cycle}/cycle_card.json",
        log:
            "results/logs/run_sparse_soup_cycle/{base}/{task}/c{cycle}.log",
        benchmark:
            "results/benchmarks/run_sparse_soup_cycle/{base}/{task}/c{cycle}.tsv"
        wildcard_constraints:
            base=one_of(SPARSE_SOUPS.bases),
            task=one_of(SPARSE_SOUPS.tasks),
            cycle=one_of([str(c) for c in SPARSE_SOUPS.cycles]),
        conda:
            SOFTWARE
        threads: 1
        resources:
            **rule_resources("run_sparse_soup_cycle"),
        params:
            sparsity=lambda wc: SPARSE_SOUPS.sparsities[int(wc.cycle) - 1],
            settings=lambda wc: SPARSE_SOUPS.copy_settings(int(wc.cycle)),
            scope=SPARSE_SOUPS.scope,
            examples=SPARSE_SOUPS.examples,
            evaluate={
                "batch_size": config["evaluate"]["batch_size"],
                "limit": config["evaluate"]["limit"],
                "seed": config["seed"],
            },
        script:
            "../../scripts/sparse_soup_cycle.py"

    rule report_sparse_soups:
        input:
            scores="results/tables/scores.csv",
            cards=SPARSE_SOUPS.card_paths(),
        output:
            table=report("results/tables/sparse_soups.md", caption="../../report/sparse_soups.rst", category="Tables"),
            csv="results/tables/sparse_soups.csv",
            plot=report("results/plots/sparse_soups.png", caption="../../report/sparse_soups.rst", category="Figures"),
            pdf="results/plots/sparse_soups.pdf",
        log:
            "results/logs/report_sparse_soups.log",
        localrule: True
        conda:
            SOFTWARE
        params:
            bases=[base for base, _, _ in SPARSE_SOUPS.units()],  # the base of each card
        script:
            "../../scripts/report_sparse_soups.py"
