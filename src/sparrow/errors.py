"""Errors a user can hit. Each message names the input at fault and how to fix it; the command
line prints it as one line on stderr and exits non-zero."""


class SparrowError(Exception):
    """Base class for errors caused by user input (files, settings, model pairings)."""


class VideoError(SparrowError):
    """A video file is missing, unreadable or unusable."""


class ConfigError(SparrowError):
    """An impossible or malformed setting (tree string, sampling parameters, frame budget)."""


class CheckpointError(SparrowError):
    """A target or draft checkpoint is missing, malformed, or does not fit its partner."""


class DataError(SparrowError):
    """Training data (prompts, datagen shards) is missing, malformed, or made for another target."""
