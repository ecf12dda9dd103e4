"""The ServerApp's closing lines."""

from __future__ import annotations

from server.app import dice_line


def test_the_dice_line_names_the_final_and_the_best_round():
    rounds = [{"round": 0, "global_dice": 0.9}, {"round": 1, "global_dice": 0.5},
              {"round": 2, "global_dice": 0.7}, {"round": 3, "global_dice": 0.6}]
    # round 0 is the untrained model and never the best round
    assert dice_line(rounds) == "global Dice: final 0.600 (round 3), best 0.700 (round 2)"


def test_no_dice_line_without_scored_rounds():
    assert dice_line([{"round": 0, "global_dice": 0.1}]) is None
    assert dice_line([{"round": 1}, {"round": 2, "global_dice": None}]) is None
