"""Errors a user can cause and fix; the CLI maps them to exit status 2 (see cli.main)."""


class ConfigError(ValueError):
    """A user-caused configuration problem (the CLI exits with status 2)."""


class DataError(ConfigError):
    """A user-caused data problem: missing path, empty corpus or split, unreadable file."""
