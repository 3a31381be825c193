"""User-facing errors: each names the file, tensor or config key at fault."""


class ArmError(Exception):
    """An error in the user's input (config, paths, data). Reported without a traceback."""


class ConfigError(ArmError):
    """A config key has a bad value."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class InputError(ArmError):
    """A file or folder the job needs is missing or unreadable."""
