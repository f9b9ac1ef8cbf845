"""metabook: the support package of the book "meta-learning that trains deep networks better".

    from metabook import run_chapter
    record = run_chapter("baseline", preset="smoke")      # same as: python -m metabook run baseline --preset smoke
"""
__version__ = "0.1.0"

from .config import ConfigError, make_config  # noqa: E402
from .methods import CHAPTERS, chapter_config, run_chapter  # noqa: E402

__all__ = ["CHAPTERS", "ConfigError", "chapter_config", "make_config", "run_chapter", "__version__"]
