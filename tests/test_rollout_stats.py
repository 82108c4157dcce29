"""The comparison's statistics as pure functions, with a ground truth built here."""

from __future__ import annotations

import math

import pytest

from db.prediction_roles import Pair
from trainer.training.rollout_stats import compare, guard, mcnemar, truth_positive, wilson


def pairs(rows):
    return [Pair(i, 1, prod, p1, cand, p2) for i, (prod, p1, cand, p2) in enumerate(rows, 1)]


def test_wilson_matches_the_textbook_and_stays_inside_zero_one():
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73
    assert wilson(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_mcnemar_exact():
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(5, 5) == 1.0
    assert mcnemar(0, 6) == pytest.approx(2 / 64)
    assert mcnemar(1, 9) == pytest.approx(2 * 11 / 1024)


def test_table_flips_and_agreement_without_labels():
    report = compare(pairs([("NORMAL", .2, "NORMAL", .3), ("NORMAL", .4, "PNEUMONIA", .6),
                            ("PNEUMONIA", .9, "PNEUMONIA", .95), ("PNEUMONIA", .7, "NORMAL", .3)]),
                     "pneumonia")
    assert report["table"] == [[1, 1], [1, 1]]
    assert report["agreement"] == 0.5 and report["flips"] == 2
    assert [(f["image_id"], f["candidate"]) for f in report["flipped"]] == [
        (2, "PNEUMONIA"), (4, "NORMAL")]
    assert report["labelled"] is None and guard(report) is None


def test_labelled_figures_and_mcnemar_from_a_truth_dict():
    rows = [("PNEUMONIA", .9, "PNEUMONIA", .8)] * 6 + [("NORMAL", .3, "PNEUMONIA", .6)] * 4 \
        + [("NORMAL", .1, "NORMAL", .2)] * 5 + [("PNEUMONIA", .6, "NORMAL", .4)] * 1
    truth = {i: "BACTERIA" for i in range(1, 11)} | {i: "NORMAL" for i in range(11, 17)}
    truth[17] = "VIRUS"  # an image not compared is ignored
    report = compare(pairs(rows), "pneumonia", truth)
    lab = report["labelled"]
    assert lab["n"] == 16 and lab["n_positive"] == 10
    assert lab["production"]["sensitivity"]["value"] == pytest.approx(0.6)
    assert lab["candidate"]["sensitivity"]["value"] == pytest.approx(1.0)
    assert lab["production"]["specificity"]["value"] == pytest.approx(5 / 6)
    assert lab["candidate"]["specificity"]["value"] == pytest.approx(1.0)
    assert lab["mcnemar"] == {"production_only_right": 0, "candidate_only_right": 5,
                              "p_value": pytest.approx(2 / 32)}
    lo, hi = lab["candidate"]["auc"]["ci95"]
    assert lo <= lab["candidate"]["auc"]["value"] <= hi
    # candidate 10/10: Wilson lower bound 0.72 is above production's 0.6: promoted
    assert guard(report) is None


def test_guard_refuses_a_candidate_worse_on_labelled_images():
    rows = [("PNEUMONIA", .9, "PNEUMONIA", .8)] * 8 + [("PNEUMONIA", .8, "NORMAL", .4)] * 4
    truth = {i: "VIRUS" for i in range(1, 13)}
    report = compare(pairs(rows), "pneumonia", truth)
    reason = guard(report)
    assert reason and "lower bound below production's 1.000" in reason
    # the guard is stage 1's: a stage-2 comparison is shown, never blocks
    stage2 = compare([Pair(1, 1, "VIRUS", .9, "BACTERIA", .2)], "infection", {1: "VIRUS"})
    assert guard(stage2) is None


def test_truth_that_says_nothing_about_a_stage_is_left_out():
    assert truth_positive("pneumonia", "PNEUMONIA") is True
    assert truth_positive("pneumonia", "NORMAL") is False
    assert truth_positive("infection", "NORMAL") is None
    assert truth_positive("infection", "PNEUMONIA") is None
    report = compare([Pair(1, 1, "VIRUS", .9, "VIRUS", .8)], "infection", {1: "PNEUMONIA"})
    assert report["labelled"] is None
