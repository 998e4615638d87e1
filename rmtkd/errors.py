"""Named exceptions and warnings shared across rmtkd (a leaf module: it imports nothing from
rmtkd, so any module can import it without cycles).

InputError               the job's own input is wrong (arguments, config, data or model file);
                         the CLI prints it as one ``rmtkd: error: ...`` line, exit code 2
SolverConvergenceError   solver="randomized" was asked for and did not converge
SolverFallbackWarning    solver="auto" fell back from the randomized solver to a full eigh
"""
from __future__ import annotations

__all__ = ["InputError", "SolverConvergenceError", "SolverFallbackWarning"]


class InputError(ValueError):
    """The job's own input is wrong: the message says what and how to fix it.

    Raise it (or a subclass) only for problems the user can fix in what they passed: an
    argument, a config file or value, a data or model file. The command line reports it
    without a traceback; any other exception is a bug and keeps its traceback.
    """


class SolverConvergenceError(RuntimeError):
    """The randomized (block Krylov) spike solver, asked for by name (solver='randomized'),
    did not converge within its basis limit. Use solver='full' (exact eigendecomposition)
    or solver='auto' (falls back to it with a :class:`SolverFallbackWarning`)."""


class SolverFallbackWarning(RuntimeWarning):
    """solver='auto' chose the randomized spike solver, which did not converge, and fell back
    to a full eigendecomposition (exact, but O(d^3) time and a d x d eigenvector matrix)."""
