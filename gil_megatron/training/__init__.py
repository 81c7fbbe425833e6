"""What every training job shares (PPO in ppo/, SFT / reward model / DPO in stages/): the loop
(loop.py), one run setup around it (run.py), checkpoints (checkpoint.py), the optimizer and model
wrapper (optim.py), the loss normaliser and metric reducer (metrics.py), console / jsonl / wandb
logging (logging.py), the memory estimate (memory.py) and fault injection (faults.py)."""
