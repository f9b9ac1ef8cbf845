"""metabook: the support package of the book "meta-learning that trains deep networks better".

    from metabook import run_chapter
    record = run_chapter("baseline", preset="smoke")      # same as: python -m metabook run baseline --preset smoke
"""
__version__ = "0.1.0"

__all__ = ["CHAPTERS", "ConfigError", "chapter_config", "make_config", "run_chapter", "__version__"]
_HOME = {"ConfigError": "config", "make_config": "config", "CHAPTERS": "methods", "chapter_config": "methods",
         "run_chapter": "methods"}


def __getattr__(name: str):
    """The public names, imported on first use (PEP 562): `python -m metabook` imports this file
    first, and torch only when the command needs it, after its Ctrl-C handler is in place."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'metabook' has no attribute {name!r}")
