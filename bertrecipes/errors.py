"""Errors caused by the user's input (config, paths, files), reported without a traceback."""


class UserError(Exception):
    """Bad input: the message names the bad value and what would be valid."""


class ConfigError(UserError, ValueError):
    """A config value is invalid or inconsistent with another."""
