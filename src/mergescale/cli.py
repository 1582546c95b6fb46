"""Command line: `mergescale merge CONFIG.yaml OUT_DIR`, `mergescale methods [--json]`,
`mergescale findings NORMALIZED_CSV [-o findings.md] [--json]`,
`mergescale results RESULTS_DIR [-o docs/results.md] [--figures DIR] [--methods DIR]`,
`mergescale record-run RECORD --step NAME --start TIME [--config C] [--results DIR] [--new]`.

Each subcommand is a `_cmd_*` function registered in `_build_parser`; add new ones there.
User errors (bad config, bad checkpoint) exit with status 2 and one line on stderr; a
failed output write (disk full) exits with status 1 and one line naming the file.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from typing import Sequence


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergescale.merge import run_merge
    from mergescale.merge.config import load_merge_config

    # The imported modules' objects live as long as the process: keep the garbage
    # collector from traversing them again in every full collection during the merge.
    gc.freeze()
    request = load_merge_config(
        args.config, args.out_dir,
        device=args.device, threads=args.threads, seed=args.seed,
        allow_pickle=args.allow_pickle or None, overwrite=args.overwrite or None,
    )
    result = run_merge(request)
    card = result.card
    print(
        f"{result.out_dir}: {card['method']} of {len(card['experts'])} experts, "
        f"{card['n_parameters']:,} parameters, {card['wall_time_s']:.1f} s, "
        f"peak RSS {card['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from mergescale.merge import list_methods
    from mergescale.rule_methods.registry import list_rule_methods

    methods, rule_methods = list_methods(), list_rule_methods()
    if args.json:
        json.dump([m.to_dict() for m in methods] + [r.to_dict() for r in rule_methods], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = []
    for m in methods:
        flags = ", ".join(f for f, on in (("base", m.needs_base), ("random", m.randomised),
                                          *((f"stats: {k}", m.needs_stats_rule) for k in m.stats),
                                          ("validation data", m.needs_data)) if on)
        rows.append(("per-tensor", m, flags))
    for r in rule_methods:
        flags = ", ".join([*r.needs, r.output.replace("_", " ")] + (["own rule"] if r.own_rule else []))
        rows.append(("rule", r, flags))
    print("kind        method [needs]: description (config: method: <name> or rule: <name>)")
    for kind, m, flags in rows:
        print(f"{kind:<11} {m.name}{f' [{flags}]' if flags else ''}: {m.description}")
        for h in m.hyperparameters:
            scope = "per expert" if h.per_expert else "global"
            print(f"    {h.name} ({h.type}, {scope}, default {h.default!r}, range {h.range_text()}): {h.description}")
        print(f"    paper: {m.paper}")
    return 0


def _cmd_findings(args: argparse.Namespace) -> int:
    from mergescale.report.findings import write_findings

    text, records = write_findings(args.normalized_csv, args.output, n_bootstrap=args.bootstrap,
                                   seed=args.seed)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.output is None:
        print(text)
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from mergescale.report.results_page import render_results_page

    render_results_page(args.results_dir, args.output, args.figures, args.methods,
                        n_bootstrap=args.bootstrap, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


def _cmd_record_run(args: argparse.Namespace) -> int:
    from mergescale.report.run_record import record_step

    record = record_step(args.record, args.step, args.start, args.end, args.config, args.results,
                         new=args.new)
    step = record["steps"][-1]
    print(f"{args.record}: {step['name']} took {step['seconds']:.0f} s; the run so far "
          f"{record['wall_seconds']:.0f} s")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergescale", description="Model merging at scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser("merge", help="merge models as a YAML config (mergekit format) says")
    merge.add_argument("config", help="merge config YAML (merge_method, base_model, models, parameters, dtype)")
    merge.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    merge.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where to compute (default cpu)")
    merge.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    merge.add_argument("--seed", type=int, default=None, help="seed for randomised methods (overrides the config)")
    merge.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin inputs (weights only)")
    merge.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    merge.set_defaults(func=_cmd_merge)

    methods = sub.add_parser("methods", help="list merge methods and their hyperparameters")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    methods.set_defaults(func=_cmd_methods)

    findings = sub.add_parser("findings", help="test the paper's claims on a normalized.csv "
                              "(the workflow's findings rule runs the same code)")
    findings.add_argument("normalized_csv", help="results/tables/normalized.csv")
    findings.add_argument("-o", "--output", default=None, help="write the findings markdown here")
    findings.add_argument("--json", action="store_true",
                          help="print a JSON list: one object per comparison and one per claim "
                               "(comparison \"claim\")")
    _add_bootstrap_arguments(findings)
    findings.set_defaults(func=_cmd_findings)

    results = sub.add_parser("results", help="write a run's results page (claims, figures, method "
                             "tables, date, commit, machine, wall time) from its tables")
    results.add_argument("results_dir", help="the run's results folder (tables/normalized.csv, run.json)")
    results.add_argument("-o", "--output", default="docs/results.md", help="the page (default docs/results.md)")
    results.add_argument("--figures", default=None, help="folder of the page's PNGs (default: figures/ beside the page)")
    results.add_argument("--methods", default=None,
                         help="results folder of the other-methods grid (its table on the page)")
    _add_bootstrap_arguments(results)
    results.set_defaults(func=_cmd_results)

    record = sub.add_parser("record-run", help="add a timed step (install, a grid) to a run's "
                            "record, results/run.json, with the commit and the machine")
    record.add_argument("record", help="the record, e.g. results/run.json")
    record.add_argument("--step", required=True, help="the step's name (e.g. install, config/study.yaml)")
    record.add_argument("--start", required=True, help="when the step started (ISO 8601, e.g. 2026-12-03T14:05:00Z)")
    record.add_argument("--end", default=None, help="when it ended (default: now)")
    record.add_argument("--config", default=None, help="the config a grid step ran")
    record.add_argument("--results", default=None, help="the results folder a grid step wrote (default results)")
    record.add_argument("--new", action="store_true", help="start a new record (drop earlier steps)")
    record.set_defaults(func=_cmd_record_run)
    return parser


def _add_bootstrap_arguments(parser) -> None:
    """The findings' resampling, the same for every command that tests the claims."""
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _input_errors() -> tuple[type[Exception], ...]:
    """The bad-input errors of the modules this command imported: an error type can only
    have been raised if its module was imported, and importing the findings' module
    (scipy) would cost a merge a second of start-up."""
    kinds = {"mergescale.merge.errors": "MergeInputError", "mergescale.report.findings": "FindingsInputError",
             "mergescale.report.run_record": "RunRecordError"}
    return tuple(getattr(sys.modules[m], name) for m, name in kinds.items() if m in sys.modules)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from mergescale.io_utils import OutputWriteError

    try:
        return args.func(args)
    except _input_errors() as e:  # evaluated only when something was raised
        print(f"mergescale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        print(f"mergescale {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
