"""The memory budget (rmbg_demo.budget): large images wait their turn instead of adding up."""
import threading

import pytest

from rmbg_demo.budget import BudgetExceeded, MemoryBudget, image_cost, parse_memory


def test_a_request_that_does_not_fit_waits_for_the_memory_and_then_runs():
    budget = MemoryBudget(100, timeout=30)
    admitted = threading.Event()
    budget.acquire(60)

    def second():
        with budget.admit(60):
            admitted.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    assert not admitted.wait(0.3)  # 60 + 60 > 100: it waits
    budget.release(60)
    assert admitted.wait(30)
    waiter.join()
    assert budget.used == 0 and budget.peak == 60  # never both at once


def test_a_request_that_waits_too_long_is_busy_and_one_that_never_fits_is_too_large():
    budget = MemoryBudget(100, timeout=0.2)
    with budget.admit(80):
        with pytest.raises(BudgetExceeded, match="busy") as busy:
            budget.acquire(30)
        assert busy.value.status == 503
    with pytest.raises(BudgetExceeded, match="over the server's 0 MB budget") as too_large:
        budget.acquire(101)
    assert too_large.value.status == 413
    with budget.admit(100):  # the budget was given back each time
        assert budget.used == 100


def test_no_budget_admits_everything_at_once():
    budget = MemoryBudget(0)
    with budget.admit(10**12), budget.admit(10**12):
        assert budget.used == 0


def test_sizes_and_costs():
    assert parse_memory("6G") == 6 * 2**30 and parse_memory("512M") == 512 * 2**20
    assert parse_memory("2.5GiB") == int(2.5 * 2**30) and parse_memory("0") == 0 and parse_memory(None) is None
    with pytest.raises(ValueError, match="max memory 'lots'"):
        parse_memory("lots")
    assert image_cost(7000, 7000) > 10**9  # a 49 MP image needs over a GB of working memory
