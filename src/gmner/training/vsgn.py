"""The ``train_vsgn`` stage: the VSGN MNER tagger (gmner.models.vsgn).

Encoder and optimiser settings come from the ``train`` params, overridden by ``train_vsgn.fit``; the
model's from ``train_vsgn``. It reads the detector candidates and their features, the patch tokens
(``patches``) and the captions (``captions``), selects the epoch on dev MNER F1 and trains through the
shared ``fit``, setting CIR's beta before each epoch (its warm-up); writes models/vsgn (with
train_summary.json) and logs to dvclive/vsgn.
"""

from __future__ import annotations

from pathlib import Path

from gmner.core.params import ParamError, check_keys
from gmner.models.vsgn import VSGNConfig, VSGNTagger
from gmner.training.tagger import build_crf_tagger
from gmner.training.visual import VisualRun, VisualTrainingSet

NAME = "vsgn"
STAGE_PARAMS = ("fit", "patches")  # the rest of the group are VSGNConfig fields
MODEL_PARAMS = tuple(f for f in VSGNConfig.__dataclass_fields__ if f not in ("visual_dim", "patch_dim"))


class VSGNTrainingSet(VisualTrainingSet):
    """``VisualTrainingSet`` that tells the model the epoch, for CIR's beta warm-up."""

    def start_epoch(self, epoch: int) -> None:
        self.tagger.start_epoch(epoch)


def vsgn_config(group: dict, visual_dim: int, patch_dim: int | None) -> VSGNConfig:
    """The model's config from the ``train_vsgn`` params; ``patch_dim`` is used only when ``patches`` is on."""
    check_keys("train_vsgn", group, (*STAGE_PARAMS, *MODEL_PARAMS))
    fields = {k: v for k, v in group.items() if k not in STAGE_PARAMS}
    try:
        return VSGNConfig(visual_dim=visual_dim, patch_dim=patch_dim if group["patches"] else None, **fields)
    except ValueError as err:  # a value the model cannot take: the param's one-line error
        raise ParamError("train_vsgn", str(err)) from None


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/vsgn and dvclive/vsgn."""
    group = params["train_vsgn"]
    probe = vsgn_config(group, 1, 1)  # the tables to read, before their sizes are known
    run = VisualRun.start(params, root, "train_vsgn", probe.top_k, probe.extras)
    visual = vsgn_config(group, run.store.dim, run.store.patch_dim)
    model = build_crf_tagger(run.cfg, run.train, VSGNTagger, visual=visual).to(run.device)
    run.finish(model, NAME, "mner", VSGNTrainingSet)
