"""The method registry: the one place that says what a method is (timm's ``@register_model`` pattern).

Each method class registers itself where it is defined (``@register_method(...)``) with its name
(the ``conf/method/<name>.yaml`` it is configured by), kind, operation, needs, keep-count rule,
paper, the reference it was checked against and how the report draws it. The bench, the report's
order and colours, help and error texts and the method table are derived from here, so that a new
method is one module plus one YAML. ``python -m tnt_lightning.methods`` prints the table.

The engine stays free of Hydra; the built-in methods register when :mod:`tnt_lightning.methods` is
imported, and out-of-tree ones when the modules declared by an entry point or an environment
variable are (:mod:`tnt_lightning.plugins`): every query here does both first, once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from ..plugins import import_plugins
from .reducer import TokenReducer

Kind = Literal["training-free", "learned"]
Operation = Literal["pruning", "merging", "pruning+merging"]
# What a method may need of the backbone: its CLS token, and parts of a block's attention.
NEEDS = ("cls_token", "attention_probs", "cls_attention", "keys", "values")
# The unpruned baseline (``method=none``): configured, reported and drawn, but no class.
BASELINE = "none"
BASELINE_COLOUR = "black"
_BUILTIN = "tnt_lightning.methods"

R = TypeVar("R", bound=type[TokenReducer])


@dataclass(frozen=True)
class MethodInfo:
    """One registered method (see :func:`register_method` for the fields)."""

    name: str
    cls: type[TokenReducer]
    kind: Kind
    operation: Operation
    needs: tuple[str, ...]
    keep_rule: str
    paper: str
    reference: str
    order: int
    colour: str
    train_overrides: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        """The ``_target_`` of its YAML: the defining module's class, not a re-export."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    *,
    kind: Kind,
    operation: Operation,
    needs: tuple[str, ...] = (),
    keep_rule: str,
    paper: str,
    reference: str,
    order: int,
    colour: str,
    train_overrides: tuple[str, ...] = (),
) -> Callable[[R], R]:
    """Class decorator registering a :class:`TokenReducer` subclass as method ``name``.

    Args:
        name: the ``method=`` option; also set as the class's ``name``.
        kind: ``training-free``, or ``learned`` (it has parameters trained by ``task=train``).
        operation: ``pruning`` (drops tokens), ``merging`` (combines them) or ``pruning+merging``.
        needs: what it needs of the backbone, from :data:`NEEDS`; ``cls_token`` also sets the
            class's ``requires_class_token``, so that binding refuses a backbone without one.
        keep_rule: how many tokens a step keeps, in a few words (``int(n*K)``).
        paper: short citation with the year.
        reference: the implementation it was checked against, or ``none, reimplemented from the paper``.
        order: its place in tables, plots and the bench (the baseline is 0).
        colour: its colour in plots (a Matplotlib colour, different from every other method's).
        train_overrides: for a learned method whose defaults train nothing (DiffRate runs its
            released schedules), the overrides that make ``task=train`` train it.

    Returns:
        The decorator, which returns the class unchanged apart from ``name`` and
        ``requires_class_token``.
    """
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"register_method({name!r}): unknown needs {unknown}; choose from {NEEDS}")

    def decorate(cls: R) -> R:
        if name == BASELINE or (name in _REGISTRY and _REGISTRY[name].cls is not cls):
            raise ValueError(f"method name {name!r} is taken (by {_REGISTRY.get(name, BASELINE)})")
        cls.name = name
        cls.requires_class_token = "cls_token" in needs
        _REGISTRY[name] = MethodInfo(
            name,
            cls,
            kind,
            operation,
            tuple(needs),
            keep_rule,
            paper,
            reference,
            order,
            colour,
            tuple(train_overrides),
        )
        return cls

    return decorate


_loaded = False


def _load() -> None:
    """Import the built-in methods, then the declared out-of-tree ones (once per process; a failed
    import is raised again on the next query rather than leaving a silently shorter registry)."""
    global _loaded
    if not _loaded:
        importlib.import_module(_BUILTIN)
        import_plugins()
        _loaded = True


def methods() -> list[MethodInfo]:
    """Every registered method, built-in and out-of-tree, in display order.

    Returns:
        Their registrations, sorted by ``order`` then name (the order of tables and plots).

    Raises:
        tnt_lightning.plugins.MethodPluginError: a declared out-of-tree module fails to import.
    """
    _load()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def method_names() -> list[str]:
    """The registered method names in display order (the baseline ``none`` not among them).

    Returns:
        The names, as ``method=`` takes them.
    """
    return [m.name for m in methods()]


def get_method(name: str) -> MethodInfo:
    """The registration of ``name``.

    Args:
        name: a method name (``method=`` option).

    Returns:
        Its registration.

    Raises:
        KeyError: no such method; the message names the registered ones.
    """
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"no method {name!r}; registered: {', '.join(method_names())}")
    return _REGISTRY[name]


def learned_methods() -> list[str]:
    """The methods with trained parameters (what ``task=train`` is for), in display order."""
    return [m.name for m in methods() if m.kind == "learned"]


def methods_without(need: str) -> list[str]:
    """The methods that do not need ``need`` (one of :data:`NEEDS`), in display order."""
    return [m.name for m in methods() if need not in m.needs]


def display_order(name: str) -> int:
    """Where ``name`` sorts: the baseline first, unregistered names after every registered one."""
    if name == BASELINE:
        return 0
    orders = {m.name: m.order for m in methods()}
    return orders.get(name, max(orders.values(), default=0) + 1)


def colour(name: str) -> str:
    """The plot colour of ``name`` (the baseline's is black); ``KeyError`` for an unknown name."""
    return BASELINE_COLOUR if name == BASELINE else get_method(name).colour


TABLE_COLUMNS = ("method", "kind", "operation", "needs", "keeps", "paper", "checked against")


def method_table() -> list[dict[str, str]]:
    """One row per method, for the docs' method table and the CLI (one source, so they agree).

    Returns:
        One dict per method in display order, keyed by ``TABLE_COLUMNS``: method, kind,
        operation, needs, keeps, paper, checked against.
    """
    return [
        {
            "method": m.name,
            "kind": m.kind,
            "operation": m.operation,
            "needs": ", ".join(m.needs) or "-",
            "keeps": m.keep_rule,
            "paper": m.paper,
            "checked against": m.reference,
        }
        for m in methods()
    ]


def markdown_table() -> str:
    """:func:`method_table` as a Markdown table."""
    rows = method_table()
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
