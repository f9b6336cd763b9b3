"""The one exception type for invalid user configuration."""


class ConfigError(ValueError):
    """A user-settable value is invalid; the message names the dotted key, the value and what is allowed."""
