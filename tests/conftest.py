"""Shared pytest configuration for metabook's tests."""


# ============================================================================================
# Book build (tests/test_book.py)
# ============================================================================================
# Tests marked `book` share one session-scoped build of the whole book at the `smoke` preset
# (papermill executes every chapter once, then Jupyter Book renders it). That build costs about a
# minute per chapter on 2 cores. Deselect them with `-m "not book"`.


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "book: executes the chapter notebooks and builds the book (slow; shared session build)",
    )


# ============================================================================================
# Shared fixtures
# ============================================================================================
import socket

import pytest


@pytest.fixture
def dead_mirror():
    """A base URL on a 127.0.0.1 port with nothing listening (connection refused): a download
    mirror that fails at once, never the network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
