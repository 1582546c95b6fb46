rule aggregate_scores:
    input:
        scores=expand("results/evals/{model}/scores.json", model=model_dirs()),
    output:
        scores=report("results/tables/scores.csv", caption="../report/scores.rst", category="Tables"),
        summary=report("results/tables/summary.md", caption="../report/summary.rst", category="Tables"),
        latex=report("results/tables/summary.tex", caption="../report/summary.rst", category="Tables"),
        normalized=report("results/tables/normalized.csv", caption="../report/normalized.rst", category="Tables"),
    log:
        "results/logs/aggregate_scores.log",
    conda:
        SOFTWARE
    params:
        held_in=HELD_IN,
        held_out=HELD_OUT,
        combos=COMBOS,
        base_labels=BASE_LABELS,
    script:
        "../scripts/aggregate.py"


rule write_findings:
    input:
        normalized="results/tables/normalized.csv",
    output:
        report("results/findings.md", caption="../report/findings.rst", category="Findings"),
    log:
        "results/logs/write_findings.log",
    conda:
        SOFTWARE
    script:
        "../scripts/findings.py"


rule plot_figures:
    input:
        normalized="results/tables/normalized.csv",
    output:
        normalized_vs_k=report(
            expand("results/plots/normalized_vs_k_{quality}.png", quality=QUALITIES),
            caption="../report/normalized_vs_k.rst",
            category="Figures",
        ),
        vs_multitask=report(
            "results/plots/merged_vs_multitask.png",
            caption="../report/merged_vs_multitask.rst",
            category="Figures",
        ),
        base_quality=report(
            "results/plots/base_quality.png",
            caption="../report/base_quality.rst",
            category="Figures",
        ),
        other_methods=report(
            "results/plots/other_methods.png",
            caption="../report/other_methods.rst",
            category="Figures",
        ),
    log:
        "results/logs/plot_figures.log",
    conda:
        SOFTWARE
    params:
        qualities=QUALITIES,
    script:
        "../scripts/plot.py"
