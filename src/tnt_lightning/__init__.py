"""tnt-lightning: faithful, comparable token reduction for vision transformers."""

__version__ = "0.1.0"
