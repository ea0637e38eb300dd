"""Exceptions shown to users: each names the file or params key at fault and what to do."""


class HetmmError(Exception):
    """Base class for errors that the CLI prints as a one-line message (no traceback)."""


class ConfigError(HetmmError):
    """A params.yaml key is missing, unknown or has a bad value."""


class DataError(HetmmError):
    """An input image, mask or folder is unusable."""


class TemplateMismatchError(HetmmError):
    """A saved template was built with settings different from the ones asking for it."""


class WeightsNotFoundError(HetmmError):
    """Pretrained backbone weights are not available offline."""
