"""A model folder's README.md in the Hugging Face model-card layout, so a folder can be uploaded to a hub as is.

The card is rendered from what the folder holds (model.json, train_summary.json, vision.json) plus the training
params and, once evaluated, the evaluate stage's headline metrics (metrics/<model>.json).
"""

from __future__ import annotations

import json
from pathlib import Path

CARD_FILE = "README.md"
PARAMS_HEADING = "Training params:"
# kind -> (what it is, the paper it follows)
KINDS = {
    "crf_tagger": ("a transformer encoder + CRF tagger over BIO tags (text only)",
                   "Lample et al. 2016, Neural Architectures for Named Entity Recognition (the BERT-CRF baseline)"),
    "grounded_tagger": ("the CRF tagger plus a grounding head choosing, per entity, one of the detector's "
                        "candidate regions or none (GMNER)",
                        "Yu et al. 2023, Grounded Multimodal Named Entity Recognition on Social Media (H-Index); "
                        "DLRAM pre-training"),
    "index_generation": ("H-Index: BART index generation over the tweet, the image and its candidate regions (GMNER)",
                         "Yu et al. 2023, Grounded Multimodal Named Entity Recognition on Social Media"),
    "vsgn": ("VSGN: text and image patch graphs fused into the CRF tagger (MNER)",
             "Visual and semantic graph networks for multimodal NER (VSGN)"),
    "bga": ("BGA-MNER: the CRF tagger trained with text / image generation in CLIP space, text only at inference "
            "(MNER)", "Chen et al. 2023, Learning Implicit Entity-object Relations by Bidirectional Generative "
            "Alignment for Multimodal NER"),
}


def write_card(model_dir: str | Path, name: str | None = None, train_params: dict | None = None,
               metrics: dict | None = None) -> Path:
    """Write ``model_dir``/README.md for the model ``name`` (default: the folder's); ``train_params``: the params
    it was trained with (kept from the previous card when None), ``metrics``: {split: headline metrics} of the
    evaluate stage."""
    model_dir = Path(model_dir)
    name = name or model_dir.name
    if train_params is None and (model_dir / CARD_FILE).is_file():
        train_params = _previous_params((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    config = json.loads((model_dir / "model.json").read_text())
    kind = config.get("kind", "unknown")
    summary = _json(model_dir / "train_summary.json") or {}
    vision = _json(model_dir / "vision.json")
    what, paper = KINDS.get(kind, (kind, "-"))
    entity_types = sorted({label[2:] for label in config.get("labels", []) if label != "O"})
    split_metrics = {split: _flat(m) for split, m in (metrics or {}).items()}
    front = ["---", "library_name: gmner", f"tags: [ner, multimodal-ner, {'gmner, ' if vision else ''}{kind}]",
             "datasets: [twitter-gmner]", "metrics: [f1, precision, recall]", "---", ""]
    lines = [f"# {name}: {kind}", "", f"{what[0].upper()}{what[1:]}.", "", f"Follows: {paper}.", "",
             "## Training", "", f"Entity types: {', '.join(entity_types) or '-'}. Train tweets: "
             f"{summary.get('train_tweets', '-')}; best epoch {summary.get('best_epoch', '-')} of "
             f"{summary.get('epochs', '-')}, selected on dev.", ""]
    if train_params:
        params = json.dumps(train_params, indent=1, sort_keys=True, default=str)
        lines += [PARAMS_HEADING, "", "```json", params, "```", ""]
    lines += ["## Metrics", ""]
    if split_metrics:
        keys = sorted({key for m in split_metrics.values() for key in m})
        lines += ["| metric | " + " | ".join(split_metrics) + " |", "|---|" + "---|" * len(split_metrics)]
        lines += [f"| {key} | " + " | ".join(_cell(m.get(key)) for m in split_metrics.values()) + " |"
                  for key in keys]
    else:
        lines += ["Not evaluated yet: `gmner evaluate --model NAME`, then `gmner card models/NAME`."]
    lines += ["", "## Vision models", ""]
    if vision:
        for stage in ("detect", "features", "caption", "synthesize"):
            if stage in vision:
                lines.append(f"- {stage}: {_reference(stage, vision[stage]['params'])}, fingerprint "
                             f"{vision[stage].get('fingerprint', '-')[:16]}")
        lines += ["", "Recorded with their params in vision.json; `gmner predict` runs them on new images."]
    else:
        lines.append("None: the model reads text only.")
    lines += ["", "## How to use", "", "```python", "import gmner", "",
              f'model = gmner.load("{name}")',
              'print(model.predict("RT @nba : LeBron James visits Cleveland", images="photo.jpg"))', "```", "",
              f"or `gmner predict {name} tweets.jsonl out.jsonl`, `gmner serve {name}`.", ""]
    path = model_dir / CARD_FILE
    path.write_text("\n".join(front + lines), encoding="utf-8")
    return path


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _flat(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key} "))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _reference(stage: str, params: dict) -> str:
    """The model a vision stage ran: its backend and the model reference it was given."""
    if stage == "detect":
        backend = params["backend"]
        sub = params.get(backend) or {}
        model = sub.get("model") or sub.get("weights") or sub.get("arch")
        return f"{backend}" + (f" ({model})" if model else "")
    if stage == "features":
        return f"{params['backend']} ({params['model']})"
    return str(params.get("model"))


def _previous_params(card: str) -> dict | None:
    """The training params block of an existing card, kept when the card is refreshed with metrics."""
    if PARAMS_HEADING not in card:
        return None
    block = card.split(PARAMS_HEADING, 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return json.loads(block)
