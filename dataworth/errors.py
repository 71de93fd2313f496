"""Named errors of the engine. Each message names the input at fault and what to do."""


class DataworthError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(DataworthError, ValueError):
    """A configuration value is invalid (rank, damping, init, module filter...)."""


class NonFiniteError(DataworthError, FloatingPointError):
    """Gradients or statistics contain NaN or Inf (typically fp16/bf16 overflow)."""


class MismatchError(DataworthError, ValueError):
    """Artifacts made with different projections or models were about to be mixed."""
