"""Reward functions written for TRL's GRPOTrainer (its signature, nothing of rlhf_toy), for the PPO tests."""

CALLS = []  # what each call received, for the tests to check


def short_and_on_title(prompts, completions, title, completion_ids, trainer_state, log_metric, **kwargs):
    """1 per completion that mentions the prompt's film, minus a length rule: -0.1 per word past 3."""
    texts = [c[0]["content"] for c in completions]
    rewards = [float(t.lower() in x.lower()) - 0.1 * max(0, len(x.split()) - 3) for t, x in zip(title, texts)]
    log_metric("short_and_on_title/words", sum(len(x.split()) for x in texts) / len(texts))
    CALLS.append(
        {
            "prompts": prompts,
            "completions": completions,
            "title": title,
            "completion_ids": completion_ids,
            "step": trainer_state.global_step,
            "other": sorted(kwargs),
            "rewards": rewards,
            "texts": texts,
        }
    )
    return rewards


def fewer_words(completions, **kwargs):
    """The length rule alone: -0.1 per word."""
    return [-0.1 * len(c[0]["content"].split()) for c in completions]


def wrong_length(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def nan_for_the_second(prompts, completions, **kwargs):
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]


def none_for_odd(prompts, completions, **kwargs):
    return [None if i % 2 else 1.0 for i in range(len(completions))]


not_a_function = 3


def gated(completions, **kwargs):
    """0 per completion, once the file named by $RLHF_TOY_TEST_GATE exists: holds a run mid-step for a test."""
    import os
    import time
    from pathlib import Path

    deadline = time.time() + 120
    while not Path(os.environ["RLHF_TOY_TEST_GATE"]).exists() and time.time() < deadline:
        time.sleep(0.05)
    return [0.0] * len(completions)


def flat_for_even_titles(completions, title, **kwargs):
    """0 for every answer to a film whose title has an even length (a group with no spread), else the answer's
    length in tens of characters (a spread that `score_clip: 10` does not flatten): for dynamic sampling."""
    return [0.0 if len(t) % 2 == 0 else len(c[0]["content"]) / 10 for t, c in zip(title, completions)]


def first_token_even(completions, completion_ids, **kwargs):
    """1 when the answer's first token id is even, else 0: a check some sampled answers pass and some fail (the tiny
    model's answers all run to the limit, so their length cannot split them), for pass@k."""
    return [float(len(ids) > 0 and ids[0] % 2 == 0) for ids in completion_ids]
