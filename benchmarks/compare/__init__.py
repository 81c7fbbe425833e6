"""A comparison harness for any grouped task: pre-registered protocols, honest statistics.

    python -m benchmarks.compare --task TASK.yaml --protocol PROTOCOL.yaml --workdir DIR
        [--quick] [--arms NAME ...] [--report-only] [--list] [--iterations N] [--eval-per-group N]
    python -m benchmarks.compare --task TASK.yaml --protocol PROTOCOL.yaml --workdir DIR --from-legacy RUNS.json

One module per job:

    spec.py      TASK.yaml and PROTOCOL.yaml -> validated Task / Protocol (one-line errors naming the key)
    runner.py    plan runs, reuse finished ones by fingerprint, train + evaluate the rest (one torchrun)
    stats.py     frontiers compared by interpolation only, paired bootstraps (pure functions)
    report.py    per-run and per-arm numbers, comparisons, win rule, predictions -> table.md/json, runs.json
    plots.py     frontier, per-group gold / KL / hack rate, training curves
    legacy.py    the old benchmarks/gil_vs_ppo.py runs.json through the new report

TASK.yaml (relative paths resolve against the YAML's directory):

    name                 the task's name
    policy               SFT policy directory (our checkpoint format): every run starts here; KL is to it
    prompts              {train, eval, ood (optional)}: prompt files with a `group` column
    reward               the trained-on reward: a reward-model directory or module:function
    gold                 optional module:function, the true reward (without it the report uses the reward)
    hack                 optional module:function returning 0/1 per response: its rate is reported per group
    scores               optional {name: module:function}: extra scores, reported as name - gold
    max_prompt_length, max_new_tokens
    easy_groups, hard_groups   optional: easy/hard rows of the report and the known-groups arm
    pythonpath           directories added so the functions import (also in the training workers)
    config               optional base PPO config every run starts from (engine defaults otherwise)
    overrides            config keys for every run ({dotted.key: value} or ["key=value", ...])
    layout               optional {nproc, tp} (default one rank at TP=1); eval_batch_size (default 64)

PROTOCOL.yaml (commit it before its first run; the report records its git blob and commit):

    name, description, iterations      the training budget of every run
    seeds                default seeds of the arms
    arms                 [{name, algo, overrides, seeds, reward: task|gold, known_groups: bool, note}],
                         or a fixed policy {name, policy: sft | DIR} (evaluated, never trained)
    overrides            config keys for every run of the protocol
    matching             {arms: [names], grid: {dotted.key: [values]}, overrides, name: "{arm}_kl{value}"}:
                         each named arm becomes one arm per grid value (its method is the original name)
    anchor               a fixed-policy arm (the SFT start, KL 0) whose point joins every frontier
    comparisons          {frontier: [{a, b, metrics}], paired: [{a, b}]}: methods or arms
    win_rule             {text, all: [conditions]} (spec.py documents the condition grammar)
    predictions          [{text, all: [conditions]}] or plain texts
    diagnostics          {column: training metric}: means over the last 20% of iterations
    bootstrap            {samples (default 2000), seed (default 0)}

Outputs in DIR: table.md, table.json ({arms, comparisons, win_rule, predictions, verdict}), runs.json,
the plots, and runs/NAME/{samples.jsonl.gz, eval.json, metrics.jsonl} for every run; every file
records the command and the commit.
"""
