"""The one exception type that fxpsweep raises for bad user input."""


class ConfigError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed.

    ``run.py`` prints it without a traceback; everything else is a bug.
    """
