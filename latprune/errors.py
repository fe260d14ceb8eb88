"""Errors with the exit status the CLI maps them to.

0 success; 2 bad input (the message names the fix); 3 the exported model failed verification
(parity with torch, int8 top-1 parity with the fp32 file, or a compact file no smaller than the
dense one); 4 the latency budget was
missed; 5 an accuracy gate (``--max-accuracy-drop``, ``--max-corruption-drop``) failed; 6
``latprune bench`` refused a claim its timings are too noisy to support (``--allow-noisy``).
A run that fails a gate (3, 4, 5) still writes its whole report first.
"""

__all__ = ["one_line", "LatpruneError", "BadInput", "CannotWrite",
           "BudgetBelowFloor", "ParityError", "BudgetMissed", "AccuracyGateFailed",
           "TooNoisy", "GATE_EXIT"]


def one_line(e: BaseException, limit: int = 120) -> str:
    """A third-party exception's message on one line, at most ``limit`` characters, for the one-line
    errors latprune prints (load_state_dict's and protobuf's messages span several lines)."""
    return " ".join(str(e).split())[:limit]


class LatpruneError(Exception):
    exit_code = 1


class BadInput(LatpruneError):
    """The user asked for something we cannot do; the message names the fix."""

    exit_code = 2


class CannotWrite(BadInput):
    """Writing a file failed (a full disk, a read-only or vanished folder, an I/O error): nothing was
    left under the file's final name, and the same command resumes once the cause is fixed."""

    @classmethod
    def of(cls, path, e: OSError) -> "CannotWrite":
        why = e.strerror or type(e).__name__
        return cls(f"cannot write {path}: {why} (errno {e.errno}); nothing partial was left under that name: "
                   "free disk space or fix the folder's permissions, then run the same command again to resume")


class BudgetBelowFloor(BadInput):
    """The budget is below the smallest latency any plan can reach."""

    def __init__(self, message: str, floor_ms: float, dense_ms: float | None = None):
        super().__init__(message)
        self.floor_ms, self.dense_ms = floor_ms, dense_ms  # dense_ms: the table's prediction, same scale


class ParityError(LatpruneError):
    exit_code = 3


class BudgetMissed(LatpruneError):
    exit_code = 4


class AccuracyGateFailed(LatpruneError):
    exit_code = 5


class TooNoisy(LatpruneError):
    exit_code = 6


# the exit status of each deployment gate of a run (report.json "gates"), in the order checked
GATE_EXIT = {"parity": ParityError.exit_code, "onnx_shrink": ParityError.exit_code,
             "int8_parity": ParityError.exit_code, "tensorrt_parity": ParityError.exit_code,
             "latency": BudgetMissed.exit_code, "params": BudgetMissed.exit_code,
             "accuracy": AccuracyGateFailed.exit_code, "corruption_accuracy": AccuracyGateFailed.exit_code}
