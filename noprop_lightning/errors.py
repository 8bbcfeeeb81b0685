"""Exceptions whose message is meant for a person, not a traceback."""


class NoPropUserError(Exception):
    """Base class for errors caused by user input (config, data, arguments).

    The command-line entry point prints only the message of these errors and exits with a
    non-zero status, so the message must say what is wrong and how to fix it.
    """


class DatasetNotFoundError(NoPropUserError):
    """Raised when dataset files are missing and cannot (or may not) be downloaded."""


class ConfigurationError(NoPropUserError, ValueError):
    """Raised for invalid hyper-parameters or incompatible settings."""
