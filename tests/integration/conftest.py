"""A session-wide real TorchServe, started from the shipped config.properties (token auth on)."""

from __future__ import annotations

import pytest

from scripts.deploy.harness import Server, make_server
from tests.integration.stack import running_stack


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = make_server(tmp_path_factory.mktemp("torchserve"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """The whole stack as `make serve` starts it: the nginx gateway in front of one TorchServe replica."""
    with running_stack(tmp_path_factory.mktemp("gateway_session")) as stack:
        yield stack
