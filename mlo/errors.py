"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what was wrong and how to fix it, in one line."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, or out of range; the message names the field."""


class DataError(UserError):
    """Data is missing or malformed; the message says where to put it or what is wrong with it."""
