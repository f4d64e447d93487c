"""Fixtures for the pipeline's tests (helpers live in ``flows_testkit``)."""

from __future__ import annotations

import logging

import pytest
from flows_testkit import FeedServer, write_config
from prefect.logging.configuration import ensure_logging_setup

from flows.commands.cli import _prefect_defaults
from flows.config import load_config
from flows.store.database import open_store

# Prefect configures its console log handler once per process (when its API is first used), on
# the sys.stderr of that moment. Done first inside a test that captures with ``capsys``, the
# handler writes to that test's stream, closed after it, and every later Prefect log line fails
# (``test_flows_signals.py`` run alone failed so). Done here, at collection, it gets the
# session's stream (and with the settings a command gives Prefect before it starts).
_prefect_defaults()
ensure_logging_setup()


@pytest.fixture(autouse=True)
def pipeline_logging_restored():
    """A command run in-process (``configure_logging``) points the ``flows`` logger at that
    test's captured stderr and stops it propagating: put it back after every test, so that a
    later one neither writes to a closed stream ("--- Logging error ---") nor finds nothing in
    ``caplog`` (a progress test failed so once in CI, depending on what ran before it)."""
    logger = logging.getLogger("flows")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = propagate, level


@pytest.fixture
def feed_server():
    server = FeedServer()
    server.thread.start()
    yield server
    server.stop.set()
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def make_config(tmp_path):
    def make(**overrides):
        return load_config(write_config(tmp_path, **overrides))

    return make


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.sqlite'}") as opened:
        yield opened


@pytest.fixture(scope="session")
def count_tokens(yalm_vocab):
    from yalm_runner.tokenizer import Tokenizer

    tokenizer = Tokenizer(yalm_vocab)
    return lambda text: len(tokenizer.encode(text))


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session, from the distribution's package.

    Not skipped when the server is missing: the error says how to install it (CI does).
    """
    from pg_server import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for the session (``prefect_test_harness``)."""
    from prefect.testing.utilities import prefect_test_harness

    # 300 s, not the harness's 30: on a loaded two-core CI machine its start has taken longer.
    with prefect_test_harness(server_startup_timeout=300):
        yield
