"""What a ``pretrain`` checkpoint is: the pre-training model's config and switches, the files it writes,
and what fine-tuning reads back from it: the text encoder (encoder/) and, from heads.safetensors, each
module by its prefix (:meth:`PretrainCheckpoint.module_state`):

- ``visual``: the FeatureStandardiser's buffers region_mean / region_std / image_mean / image_std;
- ``image``: g_v, the whole-image map into the text space (with tia or sgla);
- ``text_projection``: g_t, the map of t_CLS (with tia);
- ``objects`` (``objects: linear``) or ``connector`` (``objects: connector``): the region map into the text
  space (with eoa or sgla).

The rest (``gate``, the ``nce`` temperatures) serves pre-training only.

Kept apart from the model (gmner.pretrain.model), so that the fine-tuning stages depend on the format, not
on the alignment code."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from gmner.core.params import ParamError
from gmner.models.connector import ConnectorConfig
from gmner.models.tagger import ENCODER_DIR

KIND = "alignment_pretrain"
CONFIG_FILE = "pretrain.json"
HEADS_FILE = "heads.safetensors"
COMPONENTS = ("tia", "eoa", "global", "local", "balance", "gate")
OBJECT_MAPS = ("linear", "connector")
DEFAULT_WEIGHTS = {"tia": 1.0, "eoa": 1.0, "global": 1.0, "local": 1.0, "balance": 0.01, "gate": 1.0}
# Connector settings are ConnectorConfig's fields besides its two sizes, which the model fixes.
CONNECTOR_SIZES = ("visual_dim", "text_dim")


def connector_settings(settings: dict) -> dict:
    """``settings`` completed with ConnectorConfig's defaults (and checked), so that a checkpoint or a
    model.json states every setting its connector was built with."""
    sizes = set(CONNECTOR_SIZES) & set(settings)
    if sizes:
        raise ValueError(f"connector settings must not hold {sorted(sizes)}: the models fix them")
    return {k: v for k, v in asdict(ConnectorConfig(1, 1, **settings)).items() if k not in CONNECTOR_SIZES}


@dataclass(frozen=True)
class PretrainConfig:
    visual_dim: int  # size of the region and image embeddings
    top_k: int = 16  # candidates per image, best first
    tia: bool = True  # DLRAM text-image reflection (Eqs. 2-3)
    eoa: bool = True  # DLRAM entity-object alignment (Eq. 4)
    t2i: bool = True  # generated images stand in for irrelevant originals (tia, gate, global) and absent entities (eoa)
    sgla: bool = False  # VTC global + local alignment
    coupling: bool = True  # VTC local terms weighted by their pair's global relevance (with sgla)
    objects: str = "linear"  # the region map into the text space: linear (DLRAM) or connector (VTC)
    gate: bool = True  # relevance gate of Eq. 1, weighting tia (else alpha = 1)
    negatives: int = 16  # EOA keys per entity: the positive and negatives - 1 far regions
    temperature: float = 0.07  # initial temperature of each InfoNCE
    connector: dict = field(default_factory=dict, hash=False)  # ConnectorConfig fields; missing: its defaults
    weights: dict = field(default_factory=dict, hash=False)  # component -> loss weight; missing: DEFAULT_WEIGHTS

    def __post_init__(self):
        unknown = set(self.weights) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"pretrain weights: unknown components {sorted(unknown)}; known: {list(COMPONENTS)}")
        if self.objects not in OBJECT_MAPS:
            raise ValueError(f"objects must be one of {list(OBJECT_MAPS)}, got {self.objects!r}")
        if self.negatives < 2:
            raise ValueError(f"negatives must be at least 2 (the positive and one negative), got {self.negatives}")
        object.__setattr__(self, "connector", connector_settings(self.connector))
        object.__setattr__(self, "weights", {**DEFAULT_WEIGHTS, **self.weights})

    def connector_config(self, text_dim: int) -> ConnectorConfig:
        return ConnectorConfig(visual_dim=self.visual_dim, text_dim=text_dim, **self.connector)

    @property
    def uses_objects(self) -> bool:
        """Whether any objective reads the objects (so that the model has an object map)."""
        return self.eoa or self.sgla

    @property
    def components(self) -> tuple[str, ...]:
        """The loss components these switches compute."""
        on = {"tia": self.tia, "eoa": self.eoa, "global": self.sgla, "local": self.sgla, "gate": self.gate,
              "balance": self.uses_objects and self.objects == "connector" and self.connector["moe"]}
        return tuple(name for name in COMPONENTS if on[name])


@dataclass(frozen=True)
class PretrainCheckpoint:
    """A pretrain checkpoint as fine-tuning sees it."""

    path: Path
    config: PretrainConfig
    text_dim: int
    max_length: int
    encoder: dict  # the `train` encoder params (encoder, tiny) it was built from

    @property
    def encoder_dir(self) -> Path:
        return self.path / ENCODER_DIR

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The heads.safetensors entries under ``prefix + "."``, keyed as in that module's ``state_dict()``
        (prefix stripped); empty when the checkpoint has no such module (see the module docstring)."""
        from safetensors import safe_open

        head = prefix + "."
        with safe_open(self.path / HEADS_FILE, framework="pt") as weights:
            return {key[len(head):]: weights.get_tensor(key) for key in weights.keys() if key.startswith(head)}

    def check_compatible(self, visual_dim: int, encoder: dict) -> None:
        """Refuse fine-tuning on other features, or from other `train` encoder params, than pre-training."""
        if visual_dim != self.config.visual_dim:
            raise ValueError(f"{self.path}: pre-trained on features of size {self.config.visual_dim}, "
                             f"the fine-tuning features have size {visual_dim}")
        if encoder != self.encoder:
            raise ValueError(f"{self.path}: pre-trained from the text encoder {self.encoder}, but fine-tuning "
                             f"asks for {encoder}; rerun the pretrain stage")


def encoder_spec(train: dict) -> dict:
    """The `train` params that make the text encoder (``tiny`` only matters for the tiny one)."""
    return {"encoder": train["encoder"], "tiny": train["tiny"] if train["encoder"] == "tiny" else None}


def read_checkpoint(path: str | Path) -> PretrainCheckpoint:
    path = Path(path)
    for name in (CONFIG_FILE, HEADS_FILE, ENCODER_DIR):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name}: not a pretrain checkpoint; run the pretrain stage")
    saved = json.loads((path / CONFIG_FILE).read_text())
    if saved.get("kind") != KIND:
        raise ValueError(f"{path / CONFIG_FILE}: kind {saved.get('kind')!r} is not {KIND!r}")
    unknown = set(saved["config"]) - {f.name for f in fields(PretrainConfig)}
    if unknown:
        raise ValueError(f"{path / CONFIG_FILE}: settings {sorted(unknown)} of an older pretrain model; "
                         "rerun the pretrain stage")
    return PretrainCheckpoint(path, PretrainConfig(**saved["config"]), saved["text_dim"], saved["max_length"],
                              saved["encoder"])


def init_checkpoint(init: str | None, root: Path, where: str, visual_dim: int,
                    encoder: dict) -> PretrainCheckpoint | None:
    """The checkpoint a fine-tuning stage's ``init`` param (``where``, e.g. train_index.init) names: none,
    ``pretrain`` (models/pretrain under ``root``) or a folder; checked against the fine-tuning features' size
    and `train` encoder params. A missing, old or incompatible one is a ParamError naming the param."""
    if init in (None, "none"):
        return None
    path = Path("models/pretrain" if init == "pretrain" else init)
    try:
        checkpoint = read_checkpoint(path if path.is_absolute() else root / path)
        checkpoint.check_compatible(visual_dim, encoder)
    except (FileNotFoundError, ValueError) as err:
        raise ParamError(where, str(err)) from None
    return checkpoint
