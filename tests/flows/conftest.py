"""Fixtures for the pipeline's tests (helpers live in ``flows_testkit``)."""

from __future__ import annotations

import pytest
from flows_testkit import FeedServer, write_config

from flows.config import load_config
from flows.store.database import open_store


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

    with prefect_test_harness():
        yield
