"""Errors every layer may raise (besides ``config.ConfigError`` for bad settings)."""


class StageFailed(RuntimeError):
    """A stage ran to the end but its result is below a configured floor (exit status 1)."""
