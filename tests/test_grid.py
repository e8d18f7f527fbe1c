"""evaluation.grid: the (learning rate, epochs) choice on the selection split and its widening past the grid's edge.

Scores here are made-up functions of the cell, so every expected choice is worked out by hand."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.grid import scaled_epochs, search

LRS = [0.01, 0.03, 0.1, 0.3]


def peaked(lr_peak: float, epochs_peak: float):
    """A score with one maximum at (lr_peak, epochs_peak), falling off in log rate and log epochs."""
    def score(lr, epochs):
        return -(math.log10(lr / lr_peak)) ** 2 - (math.log2(epochs / epochs_peak)) ** 2
    return score


def test_scaled_epochs_round_half_up_at_least_one_each_once():
    assert scaled_epochs(50, [0.5, 1, 2]) == [25, 50, 100]
    assert scaled_epochs(5, [0.5, 1, 2]) == [3, 5, 10]          # 2.5 rounds up
    assert scaled_epochs(1, [0.25, 0.5, 1]) == [1]              # 0.25 and 0.5 give 1: once
    assert scaled_epochs(4, None) == [4] and scaled_epochs(4, []) == [4]


def test_a_peak_inside_the_grid_is_chosen_without_widening():
    choice = search(LRS, [25, 50, 100], peaked(0.1, 50), widen=4)
    assert (choice.lr, choice.epochs, choice.widened, choice.at_edge) == (0.1, 50, 0, [])
    assert [(c["lr"], c["epochs"]) for c in choice.cells] == [(lr, e) for e in (25, 50, 100) for lr in LRS]


def test_widening_follows_the_peak_past_both_edges():
    # Best of the grid: (0.3, 100), at the top of both. Rates first: 0.3 * 0.3 / 0.1 = 0.9 (better), then
    # 0.9 * 0.9 / 0.3 = 2.7 (worse: the rate is inside now); then epochs at rate 0.9: 100 * 100 / 50 = 200
    # (better), 200 * 200 / 100 = 400 (better, the peak), 400 * 400 / 200 = 800 (worse). Five cells widened.
    choice = search(LRS, [25, 50, 100], peaked(1.0, 400), widen=10)
    assert (choice.lr, choice.epochs, choice.widened, choice.at_edge) == (0.9, 400, 5, [])
    assert [(c["lr"], c["epochs"]) for c in choice.cells][12:] == [(0.9, 100), (2.7, 100), (0.9, 200), (0.9, 400),
                                                                    (0.9, 800)]


def test_an_exhausted_budget_says_which_edge_the_choice_is_still_on():
    choice = search(LRS, [25, 50, 100], peaked(1.0, 400), widen=2)
    assert (choice.lr, choice.epochs, choice.widened, choice.at_edge) == (0.9, 100, 2, ["epochs"])
    choice = search(LRS, [25, 50, 100], peaked(1e-4, 50), widen=0)
    assert (choice.lr, choice.widened, choice.at_edge) == (0.01, 0, ["lr"])


def test_downward_widening_and_its_floors():
    # Smallest rate best: 0.01 * 0.01 / 0.03 = 0.00333 -> 0.00333 (3 significant digits).
    choice = search(LRS, [2, 4], peaked(0.003, 1), widen=1)
    assert choice.cells[-1]["lr"] == 0.00333 and choice.at_edge == ["lr", "epochs"]
    # Epochs never below 1: from [1, 2] at 1 there is nowhere to go, and that is no edge.
    choice = search([0.1], [1, 2], peaked(0.1, 0.1), widen=5)
    assert (choice.epochs, choice.widened, choice.at_edge) == (1, 0, [])
    # Rates never above lr_max.
    choice = search([1.0, 10.0], [5], peaked(1e3, 5), widen=5, lr_max=100.0)
    assert (choice.lr, choice.widened, choice.at_edge) == (100.0, 1, [])


def test_a_single_value_is_fixed_and_ties_go_to_the_first_cell():
    choice = search([0.1], [10, 20], lambda lr, e: 1.0, widen=3)
    # A tie: the first cell (10 epochs) wins; it sits at the bottom edge, so 10 * 10 / 20 = 5 is scored, ties
    # again and loses to the earlier cell, which is inside now.
    assert (choice.lr, choice.epochs, choice.widened, choice.at_edge) == (0.1, 10, 1, [])
    choice = search([0.3], [7], lambda lr, e: 0.0, widen=3)
    assert (choice.lr, choice.epochs, len(choice.cells)) == (0.3, 7, 1)


@pytest.mark.props
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]), min_size=1, max_size=5),
       st.lists(st.integers(1, 200), min_size=1, max_size=4),
       st.floats(1e-4, 30.0), st.floats(0.5, 2000.0), st.integers(0, 12))
def test_search_properties(lrs, epochs, lr_peak, epochs_peak, widen):
    score = peaked(lr_peak, epochs_peak)
    calls = []
    choice = search(lrs, epochs, lambda lr, e: calls.append((lr, e)) or score(lr, e), widen=widen)
    cells = [(c["lr"], c["epochs"]) for c in choice.cells]
    assert cells == calls and len(set(cells)) == len(cells)                    # each cell scored once, recorded
    assert set(cells[:len(set(lrs)) * len(set(epochs))]) == {(lr, e) for lr in lrs for e in epochs}
    assert choice.widened == len(cells) - len(set(lrs)) * len(set(epochs)) <= widen
    best = max(c["r_mean"] for c in choice.cells)
    assert score(choice.lr, choice.epochs) == best                            # the choice is the best scored
    assert all(e >= 1 for _, e in cells) and all(lr > 0 for lr, _ in cells)
    if choice.widened < widen:                                                # budget left: the choice is inside
        assert choice.at_edge == []
    if len(set(lrs)) == 1:
        assert {lr for lr, _ in cells} == set(lrs)
    if len(set(epochs)) == 1:
        assert {e for _, e in cells} == set(epochs)
