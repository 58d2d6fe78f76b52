"""The exception hierarchy: every error is a FastRolloutError and, where one fits, a builtin.

Native modules raise these too (they import this module), so every error fastrollout raises
can be caught by its class from ``fastrollout``."""


class FastRolloutError(Exception):
    """Root of all errors raised by fastrollout."""


class ConfigError(FastRolloutError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range (names the path)."""


class PayloadError(FastRolloutError, ValueError):
    """An experience payload is corrupt, truncated, hostile or of an unknown format."""


class PayloadHeaderError(PayloadError):
    """A safetensors header inside a TRXP payload is not of the shape safetensors writes."""


class UnsafePickleError(PayloadError):
    """A pickle inside a TRXP payload is malformed, or uses more than plain data."""


class TasksetError(FastRolloutError, ValueError):
    """A taskset row is unreadable or lacks what the config asks for (names file, row, key),
    or a saved position does not fit the taskset."""


class EngineError(FastRolloutError, RuntimeError):
    """A recoverable per-request engine failure; the task may be retried."""


class EngineDeadError(EngineError):
    """The engine is gone for good: its slots stop taking work."""


class PipelineFullError(FastRolloutError, RuntimeError):
    """The memory sink holds ``max_buffered_experiences``; take finalized batches first."""


class SinkClosedError(FastRolloutError, RuntimeError):
    """A write to a closed sink, or a read from a closed sink that has nothing left."""


class LogLockedError(FastRolloutError, RuntimeError):
    """Another writer has the durable log folder."""


class LogCorruptError(FastRolloutError, ValueError):
    """A durable log's segment, record or ack file is not what a writer writes (names the
    file and offset)."""


class StatusError(FastRolloutError, RuntimeError):
    """An illegal task/batch transition in the status table, or a bad (out of range or
    freed) slot id: a bug in fastrollout, never the caller's input."""
