"""Errors with a meaning for the exit code."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
# sysexits EX_TEMPFAIL: the run was stopped by a signal and should be requeued; a rerun resumes.
EXIT_REQUEUE = 75


class UserError(Exception):
    """Something the user can fix (bad config, bad path, missing weights): one line, exit 2."""


class OutOfMemoryAtOneRow(RuntimeError):
    """The model does not fit even one row: the run cannot go on (exit 1)."""
