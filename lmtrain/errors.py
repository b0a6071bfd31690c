"""Errors a user can cause and fix; the CLI maps them to exit status 2 (see cli.main)."""


class ConfigError(ValueError):
    """A user-caused configuration problem (the CLI exits with status 2)."""


class DataError(ConfigError):
    """A user-caused data problem: missing path, empty corpus or split, unreadable file."""


def check(ok: bool, key: str, message: str) -> None:
    """Raises ConfigError("KEY MESSAGE") unless `ok`: the one way a config check fails."""
    if not ok:
        raise ConfigError(f"{key} {message}")


def check_all(checks: list[tuple[bool, str, str]]) -> None:
    """`check` on each (ok, key, message) in order: the first that fails raises."""
    for ok, key, message in checks:
        check(ok, key, message)
