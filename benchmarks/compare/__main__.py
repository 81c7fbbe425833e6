"""python -m benchmarks.compare --task TASK.yaml --protocol PROTOCOL.yaml --workdir DIR [options]

See benchmarks/compare/__init__.py for the files' keys and what the outputs hold."""

import argparse
import os
import shlex
import shutil
import sys
import time

from benchmarks.compare import legacy, plots, report, runner
from benchmarks.compare.spec import SpecError, check_task_functions, load_protocol, load_task, select_arms

QUICK_ITERATIONS = 3
QUICK_PROMPTS_PER_GROUP = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                description="Compare RLHF algorithms on a grouped task under a pre-registered "
                                            "protocol (benchmarks/compare/__init__.py).")
    p.add_argument("--task", required=True, help="TASK.yaml")
    p.add_argument("--protocol", required=True, help="PROTOCOL.yaml")
    p.add_argument("--workdir", required=True, help="runs, table.md, table.json, runs.json and plots")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: the first seed of each arm, {QUICK_ITERATIONS} iterations, the first "
                        f"{QUICK_PROMPTS_PER_GROUP} eval prompts of each group")
    p.add_argument("--arms", nargs="+", metavar="NAME",
                   help="train only these arms (or methods); the report covers every finished run")
    p.add_argument("--iterations", type=int, help="override the protocol's iterations (a fingerprinted change)")
    p.add_argument("--eval-per-group", type=int,
                   help=f"evaluate the first N prompts of each group (default all; --quick {QUICK_PROMPTS_PER_GROUP})")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    p.add_argument("--fresh", action="store_true", help="re-run the selected runs even when finished")
    p.add_argument("--allow-uncommitted", action="store_true",
                   help="train although the task or protocol file has uncommitted changes (the report says so)")
    p.add_argument("--results", metavar="DIR",
                   help="also copy table.md, table.json, runs.json and the plots here (e.g. benchmarks/results/NAME)")
    p.add_argument("--list", action="store_true", help="print the protocol's arms and runs, then exit")
    p.add_argument("--from-legacy", metavar="RUNS_JSON",
                   help="report an old benchmarks/gil_vs_ppo.py runs.json under this protocol (no runs)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def command_line(argv) -> str:
    return "python -m benchmarks.compare " + " ".join(shlex.quote(a) for a in argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return run(args, command_line(argv))
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, command: str) -> int:
    protocol = load_protocol(args.protocol)
    task = load_task(args.task, check_paths=not args.from_legacy)
    provenance = {"task": runner.file_provenance(task.path), "protocol": runner.file_provenance(protocol.path)}
    workdir = os.path.abspath(args.workdir)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else protocol.iterations)
    per_group = args.eval_per_group if args.eval_per_group is not None else (
        QUICK_PROMPTS_PER_GROUP if args.quick else 0)
    if args.from_legacy:
        results, planned, header = legacy.load_legacy(args.from_legacy, protocol)
        doc = report.build_document(task, protocol, results, planned, command=command, git=runner.git_state(),
                                    provenance=provenance, eval_per_group=header.get("eval_limit") or 0,
                                    iterations=header.get("iterations") or protocol.iterations)
        doc["legacy"] = legacy.legacy_note(header)
        text = report.write_report(workdir, task, protocol, results, doc)
        plots.make_plots(workdir, task, protocol, results, doc)
        print(text, flush=True)
        log(f"legacy report of {args.from_legacy} in {workdir}")
        return 0

    check_task_functions(task)
    all_runs = runner.plan_runs(task, protocol, protocol.arms, workdir, iterations=iterations,
                                eval_per_group=per_group, quick=args.quick)
    selected = {a.name for a in select_arms(protocol, args.arms)}
    if args.list:
        for r in all_runs:
            arm = protocol.arm(r.arm)
            state = "finished" if runner.finished(r) else "pending"
            print(f"{r.name:28s} {state:9s} algo={arm.algo:20s} " + " ".join(arm.overrides))
        return 0
    runner.check_runs(task, [r for r in all_runs if r.arm in selected])
    pending = [r for r in all_runs if r.arm in selected and (args.fresh or not runner.finished(r))]
    t0 = time.time()
    if args.report_only:
        if pending:
            log(f"report only: {len(pending)} run(s) not finished: {', '.join(r.name for r in pending)}")
    elif pending:
        unregistered = [p["path"] for p in provenance.values() if not p.get("committed")]
        if unregistered and not (args.quick or args.allow_uncommitted):
            raise SpecError(f"{unregistered[0]} is not committed as it is (pre-registration: commit the task and "
                            "protocol files before their runs); --quick or --allow-uncommitted run anyway")
        runner.launch(task, pending, workdir, per_group, provenance, log=log)
    else:
        log("every selected run is finished already (reused by fingerprint)")
    results = [x for r in all_runs
               for x in [report.run_result(r.name, r.arm, r.seed, r.run_dir, task, protocol.diagnostics)]
               if x is not None and runner.finished(r)]
    planned = {}
    for r in all_runs:
        planned[r.arm] = planned.get(r.arm, 0) + 1
    doc = report.build_document(task, protocol, results, planned, command=command, git=runner.git_state(),
                                provenance=provenance, eval_per_group=per_group, iterations=iterations)
    text = report.write_report(workdir, task, protocol, results, doc)
    figures = plots.make_plots(workdir, task, protocol, results, doc)
    print(text, flush=True)
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        for path in [os.path.join(workdir, n) for n in ("table.md", "table.json", "runs.json")] + figures:
            shutil.copy(path, args.results)
        log(f"copied the table, runs.json and {len(figures)} plot(s) to {args.results}")
    ran = 0 if args.report_only else len(pending)
    log(f"{ran} run(s) trained in {(time.time() - t0) / 60:.1f} min, {len(results) - ran} reused; "
        f"table.md, table.json, runs.json and plots in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
