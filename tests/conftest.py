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
# (other fixtures and hooks go below)
# ============================================================================================
