"""L-Eval's scores against values computed by hand."""

from __future__ import annotations

import pytest

from ragspec.longdoc.scoring import (
    exact_match, normalize_answer, predicted_choice, reference_choice, rouge, score, token_f1,
)

REFERENCE = "(B) Their subconscious knew that Korvin was an insoluble problem."


def test_multiple_choice_letters_as_leval_reads_them():
    assert reference_choice(REFERENCE) == "B"
    assert reference_choice("no letter here") == "A"  # L-Eval's guess
    assert predicted_choice("(B) Their subconscious") == "B"
    assert predicted_choice("The answer is C.") == "C"  # the first capital A-D
    assert predicted_choice("Because of the Ruler") == "B"  # L-Eval's rule, crude as it is
    assert predicted_choice("none of them") == "A"
    assert predicted_choice("") == ""


def test_exact_match_scores_and_their_mean():
    predictions = ["(B) Their subconscious", "The answer is C", "Because", "", "none"]
    assert [exact_match(p, REFERENCE) for p in predictions] == [1.0, 0.0, 1.0, 0.25, 0.0]
    result = score("exam", predictions, [REFERENCE] * 5)
    assert result.score == pytest.approx(45.0)  # (100 + 0 + 100 + 25 + 0) / 5
    assert result.per_answer == [100.0, 0.0, 100.0, 25.0, 0.0]
    assert exact_match("A", "AC") == 0.25  # one of two correct options (multi-answer sets)


def test_token_f1_by_hand():
    # normalised: [revenue, was, 10, million] vs [revenue, of, 10, million, dollars]: 3 common,
    # precision 3/4, recall 3/5, F1 = 2 * .75 * .6 / 1.35 = 2/3
    assert normalize_answer("The revenue was $10 million.") == "revenue was 10 million"
    assert token_f1("The revenue was $10 million.", "revenue of 10 million dollars") == pytest.approx(2 / 3)
    assert token_f1("nothing shared", "revenue") == 0.0
    assert token_f1("", "revenue") == 0.0
    result = score("f1", ["The revenue was $10 million.", "relu, selu"], [["revenue of 10 million dollars", "x"],
                                                                           "relu, selu, tanh"])
    # the second: 2 common of 2 and 3 tokens: F1 = 2 * 1 * 2/3 / (5/3) = 0.8; best reference for the first
    assert result.per_answer == pytest.approx([200 / 3, 80.0])
    assert result.score == pytest.approx((200 / 3 + 80.0) / 2)


def test_rouge_by_hand():
    # [the cat sat on the mat] vs [the cat was on the mat]: unigrams 5/6 both ways; bigrams
    # (the cat, on the, the mat) 3/5; longest common subsequence the cat on the mat: 5/6
    scores = rouge("the cat sat on the mat", "the cat was on the mat")
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    result = score("rouge", ["the cat sat on the mat"], [["a dog", "the cat was on the mat"]])
    assert result.metrics["rougeL"] == pytest.approx(500 / 6)
    assert result.score == pytest.approx((500 / 6 * 60.0 * 500 / 6) ** (1 / 3))


def test_unknown_evaluations_and_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        score("LLM", ["a"], ["a"])
    with pytest.raises(ValueError):
        score("f1", ["a", "b"], ["a"])
