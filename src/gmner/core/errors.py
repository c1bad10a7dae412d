"""Input errors that name their source, and the skip policy that turns some of them into counted skips."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping


class DataError(ValueError):
    """Bad input, located by file and line (or item id)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message


def checked_actions(actions: Mapping[str, str] | None, allowed: Mapping[str, tuple[str, ...]], where: str) -> dict:
    """A ``policy`` param validated against ``allowed`` (reason -> actions it may take); a reason left out is
    ``error``. Unknown reasons or actions raise ValueError naming ``where`` (the param's path)."""
    actions = dict(actions or {})
    unknown = sorted(set(actions) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown reasons {unknown}; known: {sorted(allowed)}")
    for reason, act in actions.items():
        if act not in allowed[reason]:
            raise ValueError(f"{where}.{reason}: {act!r} is not one of {', '.join(allowed[reason])}")
    return {reason: actions.get(reason, "error") for reason in allowed}


@dataclass
class Policy:
    """Per-reason choice between failing (``error``) and a counted skip (``skip``) or repair (``repair``).

    ``counts`` records every skip and repair by reason so the stage summary reports them;
    ``examples`` keeps the first location of each reason to make the summary actionable.
    """

    actions: Mapping[str, str]
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def action(self, reason: str) -> str:
        try:
            return self.actions[reason]
        except KeyError:
            raise KeyError(f"no policy for {reason!r}; known reasons: {sorted(self.actions)}") from None

    def handle(self, reason: str, where: str, message: str) -> str:
        """Raise for ``error``, else count the event and return the action (``skip`` or ``repair``)."""
        act = self.action(reason)
        if act == "error":
            raise DataError(where, message)
        self.counts[f"{act}:{reason}"] += 1
        self.examples.setdefault(f"{act}:{reason}", f"{where}: {message}")
        return act

    def report(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "first_example": dict(sorted(self.examples.items()))}


class ModelUnavailable(FileNotFoundError):
    """A model reference that is neither built here, a local path, nor in the local Hugging Face cache."""
