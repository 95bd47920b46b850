"""The one error type a user can fix: bad options, missing files, mismatched checkpoints.

The command line prints these as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class TrainingError(ValueError):
    """A problem with the user's request (options, data files, devices, checkpoints)."""
