"""Reward functions with defects, for the bad-input tests (importable as reward_fns:NAME)."""


def wrong_length(prompts, responses):
    return [0.0] * (len(responses) + 1)


def not_numbers(prompts, responses):
    return ["good"] * len(responses)


def nan_scores(prompts, responses):
    return [float("nan")] * len(responses)
