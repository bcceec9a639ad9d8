"""PrivacyLoss: the one (epsilon, delta) value budgets, caps, costs and spends are made of."""

from __future__ import annotations

import pytest

from dataops.values import Budget, PrivacyLoss, Spend


def test_losses_compose_by_adding_both_parts():
    assert PrivacyLoss(0.5, 1e-7) + PrivacyLoss(0.25, 2e-7) == PrivacyLoss(0.75, 3e-7)
    assert PrivacyLoss.zero() + PrivacyLoss(1.0, 0.0) == PrivacyLoss(1.0, 0.0)


@pytest.mark.parametrize(
    ("cost", "budget", "fits"),
    [
        (PrivacyLoss(1.0, 0.0), PrivacyLoss(1.0, 0.0), True),  # equal fits
        (PrivacyLoss(0.5, 1e-6), PrivacyLoss(1.0, 1e-6), True),
        (PrivacyLoss(1.1, 0.0), PrivacyLoss(1.0, 1e-6), False),  # epsilon over
        (PrivacyLoss(0.1, 2e-6), PrivacyLoss(1.0, 1e-6), False),  # delta over, epsilon well within
    ],
)
def test_a_loss_fits_a_budget_only_when_both_parts_do(cost, budget, fits):
    assert (cost <= budget) is fits
    assert (budget >= cost) is fits


def test_what_remains_never_goes_below_zero():
    assert PrivacyLoss(1.0, 1e-6).remaining_after(PrivacyLoss(0.25, 2e-6)) == PrivacyLoss(0.75, 0.0)


def test_a_loss_unpacks_as_epsilon_then_delta():
    epsilon, delta = PrivacyLoss(2.0, 1e-9)
    assert (epsilon, delta) == (2.0, 1e-9)


def test_a_loss_is_not_a_tuple():
    with pytest.raises(TypeError):
        PrivacyLoss(1.0, 0.0) + (1.0, 0.0)  # type: ignore[operator]
    assert PrivacyLoss(1.0, 0.0) != (1.0, 0.0)


def test_budget_and_spend_read_as_the_contract_names_them():
    budget = Budget("credit", total=PrivacyLoss(5.0, 1e-6), spent=PrivacyLoss(6.0, 1e-7), consumer="bank")
    assert (budget.epsilon_total, budget.delta_total, budget.epsilon_spent, budget.delta_spent) == (
        5.0,
        1e-6,
        6.0,
        1e-7,
    )
    assert (budget.epsilon_remaining, budget.delta_remaining) == (0.0, 9e-7)
    spend = Spend.of(PrivacyLoss(0.5, 0.0), budget.remaining)
    assert (spend.epsilon, spend.remaining_delta) == (0.5, 9e-7) and spend.loss == PrivacyLoss(0.5, 0.0)
