import re

from rlhf_toy import task


def test_gold_judge_on_known_phrases():
    assert task.gold_score("A wonderful, moving film. I loved every minute.") > 0.6
    assert task.gold_score("Boring, awful and a terrible waste of time.") < -0.6
    assert task.gold_score("") == task.NON_TEXT_SCORE
    assert task.gold_score("$$$ 1234 ###") == task.NON_TEXT_SCORE


def test_gold_penalises_repetition_and_rambling():
    concise = "A wonderful film with a lovely cast."
    repeated = " ".join(["wonderful film"] * 20)
    rambling = concise + " " + " ".join(f"word{i}" for i in range(80))
    parts = task.gold_parts(repeated)
    assert parts["repetition"] > 0.5 and parts["gold"] < task.gold_score(concise) - 0.5
    assert task.gold_parts(rambling)["rambling"] > 0
    assert task.gold_score(rambling) < task.gold_score(concise)
    assert -1 <= task.gold_score(repeated) <= 1


def test_gold_is_deterministic():
    text = "An odd, charming little film."
    assert task.gold_parts(text) == task.gold_parts(text)


def test_prompts_share_no_title_and_no_template():
    train, evals = task.make_prompts(600, 200, seed=0)
    assert len(train) == 600 and len(evals) == 200
    title = lambda row: re.search(r'"(.+?)"', row["prompt"][0]["content"]).group(1)
    assert not {title(r) for r in train} & {title(r) for r in evals}
    assert not set(task.TRAIN_TEMPLATES) & set(task.EVAL_TEMPLATES)
    assert task.make_prompts(600, 200, seed=0) == (train, evals)
