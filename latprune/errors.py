"""Errors with the exit status the CLI maps them to (README: 2 bad input, 3 parity, 4 budget)."""


class LatpruneError(Exception):
    exit_code = 1


class BadInput(LatpruneError):
    """The user asked for something we cannot do; the message names the fix."""

    exit_code = 2


class BudgetBelowFloor(BadInput):
    """The budget is below the smallest latency any plan can reach."""

    def __init__(self, message: str, floor_ms: float):
        super().__init__(message)
        self.floor_ms = floor_ms


class ParityError(LatpruneError):
    exit_code = 3


class BudgetMissed(LatpruneError):
    exit_code = 4
