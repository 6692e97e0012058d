"""Errors that mean "the configuration is wrong", not "autorank has a bug" (no imports).

The app (autorank/app.py) prints these as one line and exits with status 2; anything else keeps its
traceback. Raise them only where the cause is a value the user chose (a path, an option, a number).
"""


class ConfigError(ValueError):
    """A config value is invalid; the message names the value and what would be valid."""


class ConfigFileNotFound(ConfigError, FileNotFoundError):
    """A file named by the config (checkpoint, search space, data set) does not exist."""


class PlanError(ValueError):
    """A plan file or Plan is unusable: the file is missing, a directory, binary, empty, not YAML/
    JSON, not a plan mapping, names unknown keys or choices, does not fit the model, or trains
    nothing. The one exception type the torch-only API (autorank.plan) raises for a bad plan."""
