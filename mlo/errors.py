"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what was wrong and how to fix it, in one line."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, or out of range; the message names the field."""


class DataError(UserError):
    """Data is missing or malformed; the message says where to put it or what is wrong with it."""


class TrainingStopped(Exception):
    """Training stopped early on purpose (a signal) after writing a checkpoint; resumable."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NumericalFault(Exception):
    """Too many consecutive non-finite steps, or non-finite weights: training was aborted and the
    last good checkpoint left as it was."""
