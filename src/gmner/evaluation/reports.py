"""Markdown tables of the score dicts that gmner.evaluation.scoring.score returns."""

from __future__ import annotations

from gmner.evaluation.scoring import PROTOCOLS

_HEADER = (
    ["Type", "Gold", "MNER P", "MNER R", "MNER F1"]
    + [f"GMNER {p} {m}" for p in PROTOCOLS for m in ("P", "R", "F1")]
    + [f"EEG {p} F1" for p in PROTOCOLS]
)


def _prf(metrics: dict) -> list[str]:
    return [f"{metrics[k]:.2f}" for k in ("precision", "recall", "f1")]


def _row(name: str, mner: dict, gmner: dict[str, dict], eeg: dict[str, dict] | None) -> list[str]:
    cells = [name, str(mner["tp"] + mner["fn"]), *_prf(mner)]
    for protocol in PROTOCOLS:
        cells += _prf(gmner[protocol])
    return cells + [f"{eeg[p]['f1']:.2f}" if eeg else "-" for p in PROTOCOLS]


def per_type_table(score: dict) -> str:
    """One row per entity type plus ``overall``: gold count, MNER and GMNER P/R/F1, EEG F1.

    EEG ignores types, so its F1 appears in the ``overall`` row only.  MNER and GMNER count the same
    predictions and gold entities, so their per-type tables have the same types.
    """
    mner, gmner = score["mner"], score["gmner"]
    rows = [
        _row(t, mner["per_type"][t], {p: gmner[p]["per_type"][t] for p in PROTOCOLS}, None)
        for t in mner["per_type"]
    ]
    rows.append(_row("overall", mner["overall"], {p: gmner[p]["overall"] for p in PROTOCOLS}, score["eeg"]))
    lines = [_HEADER, ["---"] + ["---:"] * (len(_HEADER) - 1), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def metrics_markdown(scores: dict[str, dict], model: str) -> str:
    """A section per split: its size, candidate coverage and per-type table."""
    parts = [f"# Scores of model `{model}`\n"]
    for split, score in scores.items():
        cov = score["coverage"]
        parts.append(
            f"## {split}\n\n{score['tweets']} tweets; detector candidates cover {cov['covered']} of "
            f"{cov['groundable']} groundable entities ({cov['coverage']:.2f} %).\n\n{per_type_table(score)}"
        )
    return "\n".join(parts)
