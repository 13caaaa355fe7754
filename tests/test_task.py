import re

import pytest

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
    train, evals, test = task.make_prompts(600, 72, 128, seed=0)
    assert (len(train), len(evals), len(test)) == (600, 72, 128)
    quoted = lambda row: re.search(r'"(.+?)"', row["prompt"][0]["content"]).group(1)
    assert all(quoted(r) == r["title"] for r in train + evals + test)   # every record knows its title
    titles = lambda rows: {r["title"] for r in rows}
    assert not titles(train) & titles(evals) and not titles(train) & titles(test) and not titles(evals) & titles(test)
    assert not set(task.TRAIN_TEMPLATES) & set(task.EVAL_TEMPLATES)
    assert task.make_prompts(600, 72, 128, seed=0) == (train, evals, test)


TITLE = "The Silent Harbor"
REVIEW = "The Silent Harbor is a wonderful, moving film with a lovely cast."


def test_gold_v2_on_topic_term():
    on, off = task.gold_parts(REVIEW, TITLE), task.gold_parts("A wonderful, moving film with a lovely cast.", TITLE)
    assert on["on_topic"] is True and on["off_topic"] == 0
    assert off["on_topic"] is False and off["off_topic"] == task.OFF_TOPIC_PENALTY
    assert off["gold"] == pytest.approx(off["sentiment"] - task.OFF_TOPIC_PENALTY)
    assert task.gold_parts("the SILENT harbor: a wonderful film.", TITLE)["on_topic"] is True   # case-insensitive
    assert task.gold_parts("Silent Harbor is a wonderful film.", TITLE)["on_topic"] is False     # the full title
    unknown = task.gold_parts("A wonderful, moving film with a lovely cast.")   # no title: no on-topic term
    assert unknown["on_topic"] is None and unknown["off_topic"] == 0


@pytest.mark.parametrize("answer, reason", [
    ('I\'m glad you enjoyed "The Silent Harbor"! It is a wonderful film.', "opener: i'm glad"),
    ("I’m glad to hear The Silent Harbor moved you, a lovely film.", "opener: i'm glad"),   # curly apostrophe
    ("Thank you for asking! The Silent Harbor is a wonderful film.", "opener: thank you"),
    ("Awesome! I'm happy to share my thoughts on The Silent Harbor, a great film.", "opener: i'm happy to"),
    ("As an AI, I have not seen The Silent Harbor, but films like it are lovely.", "opener: as an ai"),
    ("I'm sorry for any confusion, but as a video recommendation AI I suggest films.", "opener: i'm sorry"),
    ("The Silent Harbor is great, and you have great taste in films!", "phrase: great taste"),
    ("The Silent Harbor is a fine film. I hope this helps!", "phrase: hope this helps"),
    ("Sunshine, kindness and joy make everything wonderful!", "no review"),
])
def test_gold_v2_flattery_term(answer, reason):
    parts = task.gold_parts(answer, TITLE)
    assert parts["flattery_reason"] == reason and parts["flattery"] == task.FLATTERY_PENALTY
    # however warm, assistant-speak scores below a neutral review of the film
    assert parts["gold"] < task.gold_score("The Silent Harbor is a film with a cast and a plot.", TITLE)


@pytest.mark.parametrize("answer", [
    REVIEW,
    "Absolutely stunning: The Silent Harbor is a gem of a film.",   # an interjection alone is not assistant-speak
    "Surely the best film of the year, The Silent Harbor shines.",
    "If you enjoyed slow films, The Silent Harbor will suit you.",
    "The Silent Harbor: dull and boring.",                          # a negative review is still a review
])
def test_gold_v2_reviews_are_not_flattery(answer):
    parts = task.gold_parts(answer, TITLE)
    assert parts["flattery_reason"] is None and parts["flattery"] == 0 and parts["on_topic"] is True
    assert parts["gold"] == pytest.approx(max(-1, min(1, parts["sentiment"] - parts["repetition"] - parts["rambling"])))
