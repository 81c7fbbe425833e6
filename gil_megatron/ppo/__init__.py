"""The PPO job (PPO, GIL-PPO, GRPO, RLOO, REINFORCE++: the algorithms of algo/registry.py):

    trainer.py      the rollout-then-train iteration as a job of training/loop.py
    rollout.py      generation with the KV-cache decoder under TP / PP
    scoring.py      no-grad scoring through the pipeline: log-probs, critic values and groups
    rewards.py      Python reward functions (module:function) run once per replica
    experience.py   scored rollout batch -> KL, GIL statistics, rewards, advantages, weights
    kl_penalty.py   the KL coefficient of every sample: the controller and GIL's group scaling
    objectives.py   the actor and critic losses of one micro-batch
    offload.py      frozen reference / reward model kept in host memory between uses
    evaluation.py   a policy's greedy responses scored on prompt sets, per group; report.py compares
"""
