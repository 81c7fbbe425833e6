"""Mutation-testing pass with mutmut over given source paths, driven by given test files.

Run through tools/mutation_test.sh (it provides mutmut in its own venv, .mutation/venv). Steps:
copy the tracked files and the built kernel (gil_megatron/_C*.so) to .mutation/work, write mutmut's
config there (mutate only the given paths; run only the given tests), let mutmut generate the
mutants and map tests to functions, optionally draw a seeded sample of the mutants, run them, and
print the kill rate and every survivor with its diff. The repository itself is never modified.
"""

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, ".mutation", "work")
PROBE = "__mutation_test_generate_only__"  # matches no mutant: mutmut generates, maps tests, stops
KILLED, SURVIVED, TIMEOUT, NO_TESTS = {1, 3}, {0}, {24, -24, 152, 255, 36}, {5, 33}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", action="append", required=True, help="file or folder to mutate (repeatable)")
    p.add_argument("--tests", action="append", required=True, help="test file or folder (repeatable)")
    p.add_argument("--sample", type=int, default=0, help="run a seeded random sample of this many mutants (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pytest-args", default="-m 'not slow'", help="extra pytest arguments (shell-quoted string)")
    p.add_argument("--max-children", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the summary to this file")
    return p.parse_args()


def prepare_work(sources, tests, pytest_args):
    import shlex

    shutil.rmtree(WORK, ignore_errors=True)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    files += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gil_megatron", "_C*.so"))]
    for rel in files:
        dst = os.path.join(WORK, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    globs = [s.rstrip("/") + ("/*" if os.path.isdir(os.path.join(ROOT, s)) else "") for s in sources]
    lines = ["[mutmut]", "source_paths = gil_megatron", "only_mutate ="]
    lines += [f"    {g}" for g in globs]
    lines += ["also_copy =", "    pytest.ini", "pytest_add_cli_args_test_selection ="]
    lines += [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args ="] + [f"    {a}" for a in ["-p", "no:warnings", "-q"] + shlex.split(pytest_args)]
    lines += ["process_isolation = forkserver", "use_git_change_detection = false"]
    with open(os.path.join(WORK, "setup.cfg"), "w") as f:
        f.write("\n".join(lines) + "\n")


def mutmut(*args, check=True):
    cmd = [os.path.join(os.path.dirname(sys.executable), "mutmut"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=WORK, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:2])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def results():
    """{mutant name: exit code or None} from mutmut's per-file .meta records."""
    out = {}
    for meta in glob.glob(os.path.join(WORK, "mutants", "**", "*.meta"), recursive=True):
        with open(meta) as f:
            out.update(json.load(f)["exit_code_by_key"])
    return out


def main():
    args = parse_args()
    t0 = time.time()
    prepare_work(args.source, args.tests, args.pytest_args)
    probe = mutmut("run", "--max-children", str(args.max_children), PROBE, check=False)
    everything = results()
    if not everything:
        sys.exit(f"error: mutmut generated no mutants:\n{probe.stdout[-3000:]}\n{probe.stderr[-3000:]}")
    names = sorted(everything)
    chosen = names if not args.sample or args.sample >= len(names) else sorted(
        random.Random(args.seed).sample(names, args.sample))
    mutmut("run", "--max-children", str(args.max_children), *chosen, check=False)
    codes = {name: results().get(name) for name in chosen}
    killed = [n for n, c in codes.items() if c in KILLED]
    survived = [n for n, c in codes.items() if c in SURVIVED]
    timeout = [n for n, c in codes.items() if c in TIMEOUT]
    no_tests = [n for n, c in codes.items() if c in NO_TESTS]
    other = [n for n in codes if n not in set(killed + survived + timeout + no_tests)]
    tested = len(killed) + len(survived) + len(timeout)
    lines = [
        f"mutmut over {', '.join(args.source)} driven by {', '.join(args.tests)} (pytest {args.pytest_args})",
        f"mutants generated: {len(names)}; run: {len(chosen)}"
        + (f" (seeded sample, seed {args.seed})" if len(chosen) < len(names) else "")
        + f"; wall time {time.time() - t0:.0f} s",
        f"killed {len(killed)}, timeout {len(timeout)}, survived {len(survived)}, "
        f"no covering test {len(no_tests)}, other {len(other)}",
        f"kill rate (killed + timeout) / (killed + timeout + survived): "
        f"{(len(killed) + len(timeout)) / max(tested, 1):.1%} of {tested}",
    ]
    for title, group in (("survivors", survived), ("no covering test", no_tests), ("other", other)):
        if not group:
            continue
        lines += ["", f"--- {title} ---"]
        for name in group:
            diff = mutmut("show", name, check=False).stdout.strip()
            lines += [f"{name} (exit {codes[name]})", diff, ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
