"""Token budgets, in one place.

- `rows`: budgets as data: the `budgets` rows and grants, cached in memory (`BudgetBook`), and the
  period arithmetic they use.
- `quota`: what a budget looks like to the caller: its state, headers and messages, and a request's
  `Reservation`.
- `engine`: the counters in Redis: the tenant binding, one atomic reserve before a request
  (`reserve.lua`), one settle after (`settle.lua`), and the rebuild of a lost counter from PostgreSQL.
"""

from .engine import BudgetEngine

__all__ = ["BudgetEngine"]
