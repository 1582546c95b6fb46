# How far each base's experts move from it (task-vector norms) and how their moves
# relate (cosine similarity): the regime merging works in.
rule compute_task_vector_stats:
    input:
        base="results/bases/{base}",
        experts=lambda wc: [f"results/experts/{wc.base}/{t}" for t in HELD_IN],
    output:
        "results/tables/task_vectors/{base}.json",
    log:
        "results/logs/compute_task_vector_stats/{base}.log",
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("compute_task_vector_stats", task_vector_work),
    params:
        tasks=HELD_IN,
    script:
        "../scripts/task_vector_stats.py"


rule write_task_vector_table:
    input:
        expand("results/tables/task_vectors/{base}.json", base=GRID_BASES),
    output:
        report("results/tables/task_vectors.md", caption="../report/task_vectors.rst", category="Tables"),
    log:
        "results/logs/write_task_vector_table.log",
    conda:
        SOFTWARE
    script:
        "../scripts/task_vector_table.py"


# The hyperparameters tuning chose, per base, method and k.
rule write_tuning_table:
    input:
        tuning_records(),
    output:
        report("results/tables/tuning.md", caption="../report/tuning.rst", category="Tables"),
    log:
        "results/logs/write_tuning_table.log",
    conda:
        SOFTWARE
    script:
        "../scripts/tuning_table.py"
