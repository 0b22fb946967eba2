"""The base of every error vrp-eval raises on purpose (bad input, a missing device, an unreachable Hub).

Each carries a message that names the problem and the fix. The `vrp-eval` command prints such an
error as one line and exits 2 (`--debug` or VRP_EVAL_DEBUG=1 shows the traceback); anything else is
a bug and keeps its traceback.
"""


class VrpError(Exception):
    """An expected failure with a message for the user."""
