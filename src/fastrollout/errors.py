"""The exception hierarchy: every error is a FastRolloutError and, where one fits, a builtin."""


class FastRolloutError(Exception):
    """Root of all errors raised by fastrollout."""


class ConfigError(FastRolloutError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range (names the path)."""


class PayloadError(FastRolloutError, ValueError):
    """An experience payload is corrupt, truncated, hostile or of an unknown format."""


class EngineError(FastRolloutError, RuntimeError):
    """A recoverable per-request engine failure; the task may be retried."""


class EngineDeadError(EngineError):
    """The engine is gone for good: its slots stop taking work."""
