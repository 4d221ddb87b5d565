"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class LightuneError(Exception):
    """A problem the user can fix (bad input, bad config, missing file); never a bug."""


class ConfigError(LightuneError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(LightuneError):
    """A dataset or input file cannot be used as given."""


class ModelError(LightuneError):
    """A base model, adapter or run directory cannot be loaded."""


class UnknownAdapterError(ModelError):
    """A served adapter name that is not loaded."""


class AdapterConflictError(ModelError):
    """An adapter change that the server refuses: a name already in use, or removing the last adapter."""


class TrainingError(LightuneError):
    """Training cannot go on as configured (the loss became NaN or infinite)."""
