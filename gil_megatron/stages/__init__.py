"""The stages before and beside PPO, on the same engine: SFT, reward-model training, DPO.

    torchrun --nproc-per-node 2 tools/train_sft.py examples/configs/sft_miniature.yaml
    torchrun --nproc-per-node 2 tools/train_reward_model.py examples/configs/rm_miniature.yaml
    torchrun --nproc-per-node 2 tools/train_dpo.py examples/configs/dpo_miniature.yaml

``common.py`` holds what they share (models, optimizer, data, eval, checkpoint/resume, final save)
and hands the steps to gil_megatron/training/loop.py, the loop PPO runs too; ``sft.py``, ``reward_model.py``
and ``dpo.py`` hold only what differs: the data, how a batch becomes micro-batches and the loss of
one micro-batch (math in ``gil_megatron.algo.preference``).
"""
