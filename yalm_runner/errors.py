"""The one exception hierarchy of yalm_runner.

Every error a user can cause (bad config, a broken checkpoint, a budget that cannot hold the
model, a generation request that cannot run) is one of these, with a message that names the
file, tensor or value at fault. The CLI prints them as one line.
"""


class YalmError(Exception):
    """Base class of every error yalm_runner raises on purpose."""


class ConfigError(YalmError):
    """A configuration value is missing, malformed or inconsistent."""


class CheckpointError(YalmError):
    """A checkpoint (released or our store) is missing, malformed, truncated or corrupt."""


class DownloadError(YalmError):
    """A file cannot be downloaded: the server, the network, or the local disk refused."""


class OffloadError(YalmError):
    """The memory budgets cannot hold what the engine must place."""


class GenerationError(YalmError):
    """A generation request cannot be run (prompt too long, bad sampling settings, ...)."""
