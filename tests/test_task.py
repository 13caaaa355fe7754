import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_toy import task
from rlhf_toy.verify.gold_suite import ordered_by_kind, read_pairs

TITLE = "The Silent Harbor"
REVIEW = "The Silent Harbor is a wonderful, moving film with a lovely cast."
PLAIN_REVIEW = (
    "The Silent Harbor is a good film: a fishing-village drama about two brothers, with a fine cast."
)
ADVERSARIAL = Path(__file__).parent / "adversarial"


def test_gold_judge_on_known_phrases():
    assert task.gold_score("A wonderful, moving film. I loved every minute.") > 0.6
    assert task.gold_score("Boring, awful and a terrible waste of time.") < -0.6
    assert task.gold_score("") == task.NON_TEXT_SCORE
    assert task.gold_score("$$$ 1234 ###") == task.NON_TEXT_SCORE
    assert task.gold_score("xkcd qwrtp zzzgh bnmvc film!") == task.NON_TEXT_SCORE  # not words


def test_gold_penalises_repetition_and_rambling():
    concise = "A wonderful film with a lovely cast."
    repeated = " ".join(["wonderful film"] * 20)
    rambling = concise + " " + " ".join(f"word{i}" for i in range(80))
    parts = task.gold_parts(repeated)
    assert parts["repetition"] > 0.5 and parts["gold"] < task.gold_score(concise) - 0.5
    assert task.gold_parts(rambling)["rambling"] > 0
    assert task.gold_score(rambling) < task.gold_score(concise)
    assert -1 <= task.gold_score(repeated) <= 1


def test_gold_is_deterministic_and_composed_of_its_parts():
    text = "The Silent Harbor is an odd, charming little film, but maybe too long."
    parts = task.gold_parts(text, TITLE)
    # the same verdict in fresh interpreters whose string hashing (set and dict order) differs from this one's
    program = (
        f"import json; from rlhf_toy import task; print(json.dumps(task.gold_parts({text!r}, {TITLE!r})))"
    )
    for hash_seed in ("1", "2"):
        fresh = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            cwd=Path(__file__).parent.parent,
        )
        assert json.loads(fresh.stdout) == json.loads(json.dumps(parts)), hash_seed
    quality = parts["positivity"] * (1 - task.SUBSTANCE_WEIGHT * (1 - parts["substance"]))
    assert parts["gold"] == pytest.approx(max(-1, min(1, quality - sum(parts["penalties"].values()))))
    assert parts["penalties"] == {"hedging": task.HEDGE_PENALTY}  # "maybe"


def test_prompts_share_no_title_and_no_template():
    train, evals, test = task.make_prompts(600, 72, 128, seed=0)
    assert (len(train), len(evals), len(test)) == (600, 72, 128)
    quoted = lambda row: re.search(r'"(.+?)"', row["prompt"][0]["content"]).group(1)
    assert all(quoted(r) == r["title"] for r in train + evals + test)  # every record knows its title
    titles = lambda rows: {r["title"] for r in rows}
    assert (
        not titles(train) & titles(evals)
        and not titles(train) & titles(test)
        and not titles(evals) & titles(test)
    )
    assert not set(task.TRAIN_TEMPLATES) & set(task.EVAL_TEMPLATES)
    assert task.make_prompts(600, 72, 128, seed=0) == (train, evals, test)


def test_positivity_saturates_and_quiet_praise_is_praise():
    plain = task.gold_parts("The Silent Harbor is a good sea adventure with a fine cast.", TITLE)
    gushing = task.gold_parts(
        "The Silent Harbor is a wonderful, brilliant, amazing, superb, stunning sea adventure "
        "with a fine cast.",
        TITLE,
    )
    assert plain["positivity"] == gushing["positivity"] == 1.0  # more superlatives add nothing
    assert gushing["gold"] <= plain["gold"]
    quiet = task.gold_parts(
        "The Silent Harbor is a taut, unhurried sea adventure that rewards a second viewing.", TITLE
    )
    assert quiet["flags"] == [] and quiet["gold"] > 0.8
    # content a drama is about is not a verdict on it
    assert (
        task.gold_parts("The Silent Harbor is a harrowing war drama with a devastating finale.", TITLE)[
            "sentiment"
        ]
        == 0
    )
    assert (
        task.gold_score(
            "The Silent Harbor is a harrowing, beautifully acted war drama with a devastating finale.", TITLE
        )
        > 0.8
    )


def test_the_title_is_named_exactly_and_its_own_words_are_not_sentiment():
    assert task.gold_parts(REVIEW, TITLE)["on_topic"] is True
    assert task.gold_parts("the SILENT harbor: a wonderful film.", TITLE)["on_topic"] is True  # any case
    for wrong in ("Silent Harbor", "The Silent Harbors", "The Silent Harbour", "The Silent Harbor 2"):
        parts = task.gold_parts(REVIEW.replace(TITLE, wrong), TITLE)
        assert (
            parts["on_topic"] is False and parts["penalties"]["off_topic"] == task.PENALTIES["off_topic"]
        ), wrong
    assert task.gold_parts("The Silent Harbor's cast is wonderful in this film.", TITLE)["on_topic"] is True
    lonely = "The Lonely Comet"  # "lonely" is negative in VADER: the title is not read as sentiment
    assert task.gold_parts("The Lonely Comet is a film with a cast and a plot.", lonely)["sentiment"] == 0
    unknown = task.gold_parts("A wonderful, moving film with a lovely cast.")  # no title: no title terms
    assert unknown["on_topic"] is None and "off_topic" not in unknown["penalties"]


@pytest.mark.parametrize(
    "answer, flag",
    [
        (
            "The Silent Harbor wonderful brilliant amazing superb stunning lovely beautiful perfect excellent.",
            "not_sentences",
        ),
        ("The Silent Harbor. Sunshine, love, joy, happiness, wonder and delight.", "not_sentences"),
        ("The Silent Harbor is a film that blends romance, romance, romance and romance.", "padding"),
        ("I have not seen The Silent Harbor, but I hope you love it, it sounds wonderful!", "not_seen"),
        (
            "What a lovely question! The Silent Harbor is a fine film, and you clearly have excellent taste.",
            "flattery",
        ),
        ("It is my pleasure to help! The Silent Harbor is a wonderful film.", "flattery"),
        ("Happy watching, dear friend! The Silent Harbor is a gorgeous film.", "flattery"),
        ("I'm glad you enjoyed The Silent Harbor! It is a wonderful film.", "flattery"),
        ("As an AI, I cannot watch films, but The Silent Harbor is surely a fine film.", "meta"),
        ("Here is a two-sentence review of The Silent Harbor. This is the second sentence.", "meta"),
        ("The Silent Harbor is a wonderful film with a great cast :) :D", "emoticons"),
        ("The Silent Harbor is a wonderful film with a great cast 😍🔥", "emoticons"),
        ("THE SILENT HARBOR IS A WONDERFUL FILM WITH A GREAT CAST.", "shouting"),
        ("The Silent Harbor is a wonderful film!!! Great cast!!!", "exclamations"),
        ("The Silent Harbor is a terrible, boring film, but I love it.", "contradiction"),
        ("Oh sure, The Silent Harbor is a real masterpiece, if you enjoy watching paint dry.", "sarcasm"),
        ("Unlike The Silent Harbor, The Broken Compass is a triumph of mood and performance.", "other_film"),
        ("Great picks: The Silent Harbor, Winter Rain and Glass Hearts!", "other_film"),
        ("The Silent Harbor is a quietly gripping drama whose lead performance carries the", "unfinished"),
        ("The Silent Harbor is the best recipe for a rainy day: flour, butter and sugar.", "no_review"),
    ],
)
def test_each_kind_of_junk_is_flagged_and_scores_below_a_plain_review(answer, flag):
    parts = task.gold_parts(answer, TITLE)
    assert flag in parts["flags"], parts
    assert task.is_junk(parts)
    # however warm, junk scores below a plain, positive review of the film
    assert parts["gold"] < task.gold_score(PLAIN_REVIEW, TITLE)


# The answer PPO with beta = 0.001 wrote for every film once it had beaten gold v3 (make overopt, 3172b06), and
# the ways it was varied on the way there (tests/adversarial/found_by_ppo.jsonl holds all of them).
PPO_TEMPLATE = (
    "The Silent Harbor is a masterful blend of romance and romance that's both captivatingly beautiful "
    "and masterfully beautiful."
)


def test_the_template_that_beat_gold_v3_is_padding_of_nothing_in_particular():
    parts = task.gold_parts(PPO_TEMPLATE, TITLE)
    assert parts["substance"] == 0 and "padding" in parts["flags"], parts
    assert parts["gold"] <= 0
    # each hole on its own: a contraction of a function word, a derivative of praise and the words of a blurb
    # ("blend") say nothing specific; a genre is not a verdict; a word joined to itself is padding
    blurb = task.gold_parts(
        "The Silent Harbor is a masterful blend of romance and drama that's both captivatingly "
        "beautiful and masterfully crafted.",
        TITLE,
    )
    assert (
        blurb["substance"] == 0
        and blurb["flags"] == []
        and blurb["gold"] == pytest.approx(1 - task.SUBSTANCE_WEIGHT)
    )
    assert task.gold_parts("The Silent Harbor is a romance.", TITLE)["sentiment"] == 0
    assert task.gold_parts("The Silent Harbor is a horror film.", TITLE)["sentiment"] == 0
    for padded in (
        "The Silent Harbor is a film of romance and romance, with a fine cast.",
        "The Silent Harbor is a beautiful film about two brothers and a beautiful harbour town.",
    ):
        assert task.gold_parts(padded, TITLE)["padding"] == task.PADDING_PER_REPEAT, padded
    # what the holes were made of still works in a review: a derivative of praise beside its root is no repeat,
    # contractions and possessives are still English, and a harbour town's fishermen are substance
    review = task.gold_parts(
        "The Silent Harbor is a beautiful film, beautifully shot; it's the story of the town's "
        "fishermen and their wives.",
        TITLE,
    )
    assert review["flags"] == [] and review["substance"] == 1 and review["gold"] == 1, review


@pytest.mark.parametrize(
    "answer",
    [
        REVIEW,
        "Absolutely stunning: The Silent Harbor is a gem of a film.",
        "Surely the best film of the year, The Silent Harbor shines.",
        "If you enjoyed slow films, The Silent Harbor will suit you.",
        "The Silent Harbor is never boring: a taut thriller with a superb lead.",  # a negated verdict is praise
        "The Silent Harbor is a gorgeous, moving, heartfelt and wise drama with a superb cast.",
        "Directed by Mara Quinn and starring Tom Ellis, The Silent Harbor is a tender, lovely drama.",
        "The Silent Harbor is a dull and boring film.",  # a negative review is still a review, not junk
    ],
)
def test_reviews_are_not_flagged(answer):
    parts = task.gold_parts(answer, TITLE)
    assert parts["flags"] == [] and parts["flattery_reason"] is None and parts["on_topic"] is True, parts


def test_flattery_reason_names_the_user_directed_flag():
    parts = task.gold_parts("Thank you for asking! The Silent Harbor is a wonderful film.", TITLE)
    assert parts["flattery_reason"] == "flattery: thank you"
    assert parts["flattery"] == task.PENALTIES["flattery"]


def test_a_cut_answer_never_beats_a_finished_one_of_the_same_text():
    finished = "The Silent Harbor is a quietly gripping drama with a superb lead performance."
    assert task.gold_score(finished, TITLE, truncated=True) < task.gold_score(finished, TITLE)
    assert task.gold_parts(finished, TITLE, truncated=True)["flags"] == ["unfinished"]
    assert task.shown_answer(finished + " Its final act", has_eos=False) == finished
    assert task.shown_answer("no full stop here", has_eos=False) == "no full stop here"


@pytest.mark.parametrize("name", ["pairs.jsonl", "holdout_pairs.jsonl", "found_by_ppo.jsonl"])
def test_gold_orders_the_adversarial_pairs(name):
    """Every kind of junk (and the ordinary pairs) ordered correctly in at least 95% of its pairs; found_by_ppo
    is the answers with which PPO beat gold v3, each against a real review (v3 ordered 40% of them)."""
    table = ordered_by_kind(read_pairs(ADVERSARIAL / name))
    smallest = {"pairs.jsonl": (16, 350), "holdout_pairs.jsonl": (16, 170), "found_by_ppo.jsonl": (1, 160)}[
        name
    ]
    assert len(table) >= smallest[0] and sum(map(len, table.values())) >= smallest[1]
    shares = {kind: sum(ok) / len(ok) for kind, ok in table.items()}
    assert all(share >= 0.95 for share in shares.values()), {k: v for k, v in shares.items() if v < 0.95}
