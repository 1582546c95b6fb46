rule aggregate:
    input:
        scores=expand("results/evals/{model}/scores.json", model=model_dirs()),
    output:
        scores=report("results/tables/scores.csv", caption="../report/scores.rst", category="Tables"),
        summary=report("results/tables/summary.md", caption="../report/summary.rst", category="Tables"),
        normalized="results/tables/normalized.csv",
    log:
        "results/logs/aggregate.log",
    params:
        held_in=HELD_IN,
        held_out=HELD_OUT,
        combos=COMBOS,
        methods={name: spec.get("method", spec.get("rule")) for name, spec in METHODS.items()},
    script:
        "../scripts/aggregate.py"


rule plot:
    input:
        normalized="results/tables/normalized.csv",
    output:
        report(
            "results/plots/normalized_vs_k.png",
            caption="../report/normalized_vs_k.rst",
            category="Figures",
        ),
    log:
        "results/logs/plot.log",
    script:
        "../scripts/plot.py"
