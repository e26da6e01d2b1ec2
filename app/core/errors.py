"""Errors the core raises for bad models, bad bundles and bad input: each says what to fix."""


class AdvguardError(Exception):
    """Base class: every error the core raises on purpose."""


class ModelLoadError(AdvguardError):
    """Unknown architecture, missing weights file, or weights that do not fit the architecture."""


class BundleError(AdvguardError):
    """A bundle that is incomplete, tampered with, or does not match its model."""


class ConfigError(AdvguardError):
    """Options that cannot work (a value out of range), or a path the job would overwrite or
    delete though it holds someone else's files."""


class SourceError(AdvguardError):
    """An image source that cannot be read at all (individual bad images are skipped instead)."""


class StaleWorkDirError(SourceError):
    """A build's work directory holds feature chunks of another build (another source, model or
    layer set): the builder will not mix them. Its owner decides: a user's directory is left
    alone; the evaluation's cache starts it afresh."""
