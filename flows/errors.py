"""The one exception hierarchy of the pipeline (``flows``).

Every error a user or the outside world can cause (a bad config key, a feed that will not parse,
a template that refers to a missing variable, a database that cannot be opened) is one of these,
with a message naming the key, feed, template or file at fault. The CLI prints them as one line.
This module knows nothing of where the errors come from.
"""


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class PipelineConfigError(PipelineError):
    """The pipeline's config file is missing, malformed, or has a bad key or value."""


class FeedError(PipelineError):
    """One feed could not be fetched or parsed (HTTP error, timeout, size cap, bad XML, ...)."""


class TemplateError(PipelineError):
    """A prompt template is malformed, refers to a missing variable, or cannot fit the model."""


class StoreError(PipelineError):
    """The database cannot be opened, migrated, read or written as asked."""


class NightInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a night (``signum`` says which); what was stored stays."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interrupt_signal(exc: BaseException) -> int | None:
    """The signal's number when ``exc`` means a signal stopped the work (Ctrl-C, SIGTERM, the
    job core's ``GenerationInterrupted``, Prefect's ``TerminationSignal``), else None."""
    import signal

    signum = getattr(exc, "signum", None) or getattr(exc, "signal", None)
    if isinstance(exc, KeyboardInterrupt):
        return int(signum or signal.SIGINT)
    if type(exc).__name__ in ("GenerationInterrupted", "TerminationSignal") and signum:
        return int(signum)
    return None


def is_interrupt(exc: BaseException) -> bool:
    return interrupt_signal(exc) is not None
