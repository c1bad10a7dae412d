"""The type and allowed values of every param: the one place a param is declared.

``SPEC`` mirrors params.yaml group by group. ``gmner.core.params.load_params`` checks the whole tree against it
(after overrides) before a stage does any work, so an unknown key or a bad value is one line naming the key,
the value and what is allowed. A new param is one line here, in its group, beside its line in params.yaml
(``tests/test_user_errors.py`` fails until both exist); a key params.yaml may leave out goes in its group's
``optional``. The rules between params (``detect.top_k`` against the trainers' ``top_k``, ``hidden``
divisible by ``heads``, ...) are the readers' (``check_rules``, the model configs).

A params file may be partial (a config file, a test's params): only the keys present are checked.
"""

from __future__ import annotations

import json
import math
import re

from gmner.core.errors import DataError


class ParamError(DataError):
    """A param that does not exist or has a value it cannot take; ``where`` is the key's dotted path."""


def show(value) -> str:
    """A value in a message: a string quoted as Python does (as the readers' own messages do), anything else
    as YAML would write it (JSON, a subset: true, null, [1, 2])."""
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


class Spec:
    """What one param may be. ``allowed`` completes '<value> is not ...' in the error message."""

    allowed = "a value"

    def accepts(self, value) -> bool:
        return True

    def check(self, value, where: str) -> None:
        if not self.accepts(value):
            raise ParamError(where, f"{show(value)} is not {self.allowed}")

    def child(self, where: str, key: str) -> Spec:
        """The spec of ``where.key`` (for ``group.key=value`` overrides); only groups have children."""
        raise ParamError(_join(where, key), f"unknown param; {where} is a single value, not a group")


class Bool(Spec):
    allowed = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class Num(Spec):
    """A finite number (an int is one too, a bool is not), within the bounds given: ``min`` / ``max``
    inclusive, ``above`` / ``below`` exclusive."""

    kind = "a number"

    def __init__(self, min=None, max=None, *, above=None, below=None):
        self.low, self.low_open = (above, True) if above is not None else (min, False)
        self.high, self.high_open = (below, True) if below is not None else (max, False)
        if self.low is not None and self.high is not None:
            self.allowed = (f"{self.kind} in {'(' if self.low_open else '['}{self.low}, "
                            f"{self.high}{')' if self.high_open else ']'}")
        elif self.low is not None:
            self.allowed = f"{self.kind} {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            self.allowed = f"{self.kind} {'<' if self.high_open else '<='} {self.high}"
        else:
            self.allowed = self.kind

    def is_kind(self, value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def accepts(self, value) -> bool:
        if not self.is_kind(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


class Int(Num):
    kind = "an integer"

    def is_kind(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


class Str(Spec):
    """A string, ``empty`` or not; ``allowed`` says what it names."""

    def __init__(self, allowed: str = "a string", empty: bool = True):
        self.allowed, self.empty = allowed, empty

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (self.empty or value != "")


class OneOf(Spec):
    def __init__(self, *choices: str):
        self.choices = choices
        self.allowed = f"one of {', '.join(choices)}"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.choices


class Device(Spec):
    allowed = "a device: cpu, cuda, cuda:N, mps or auto"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", value) is not None


class Nullable(Spec):
    def __init__(self, inner: Spec):
        self.inner = inner
        self.allowed = f"null or {inner.allowed}"

    def check(self, value, where: str) -> None:
        if value is not None and not self.inner.accepts(value):
            super().check(value, where)  # the message names both: null or ...
        elif value is not None:
            self.inner.check(value, where)  # a list's items, a group's keys

    def accepts(self, value) -> bool:
        return value is None or self.inner.accepts(value)


class ListOf(Spec):
    """A list whose items are each checked, as ``where[i]``."""

    def __init__(self, item: Spec):
        self.item = item
        self.allowed = f"a list (items: {item.allowed})"

    def accepts(self, value) -> bool:
        return isinstance(value, list)

    def check(self, value, where: str) -> None:
        super().check(value, where)
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


class Group(Spec):
    """A mapping of named params; a key it does not declare is an error naming it. ``optional``: keys
    params.yaml may leave out (every other one is in it)."""

    allowed = "a mapping of params"

    def __init__(self, fields: dict[str, Spec], optional: dict[str, Spec] | None = None):
        self.fields = {**fields, **(optional or {})}
        self.optional = frozenset(optional or ())

    def accepts(self, value) -> bool:
        return isinstance(value, dict)

    def child(self, where: str, key: str) -> Spec:
        if key not in self.fields:
            raise ParamError(_join(where, key), f"unknown param; known: {', '.join(sorted(self.fields))}")
        return self.fields[key]

    def check(self, value, where: str) -> None:
        super().check(value, where)
        for key, item in value.items():
            self.child(where, key).check(item, _join(where, key))


class Map(Spec):
    """A mapping whose keys are names the user chooses (e.g. split -> file), each value checked."""

    def __init__(self, value: Spec, keys: str = "names"):
        self.value = value
        self.allowed = f"a mapping of {keys} to {value.allowed}"

    def accepts(self, value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and k for k in value)

    def child(self, where: str, key: str) -> Spec:
        return self.value

    def check(self, value, where: str) -> None:
        super().check(value, where)
        for key, item in value.items():
            self.value.check(item, _join(where, key))


# --- the params ------------------------------------------------------------------------------------------
# Choices here are those of the modules reading them (tests/test_user_errors.py checks they agree).

PATH = Str("a path", empty=False)
MODEL = Str("a model: tiny, a hub id or a local folder", empty=False)
INIT = Nullable(Str("pretrain, none, or a pretrain checkpoint folder", empty=False))
PRECISION = OneOf("fp32", "fp16", "bf16")
POSITIVE, COUNT = Int(min=1), Int(min=0)  # sizes, lengths, epochs; worker processes, threads
SEED = Int(0, 2**32 - 1)  # what numpy takes
WEIGHT, RATE = Num(min=0), Num(above=0)  # loss weights; learning rates, temperatures
UNIT = Num(0, 1)  # IoU and similarity thresholds, shares
DROPOUT = Num(0, below=1)
IMAGE_POLICY = Group({reason: OneOf("error", "skip") for reason in (
    "missing_image", "empty_image", "not_an_image", "corrupt_image", "decompression_bomb")})
IMAGES = {"max_pixels": POSITIVE, "max_side": POSITIVE, "policy": IMAGE_POLICY}  # every stage decoding images


def sizes(*keys: str) -> Group:
    """A ``tiny`` random-weight model config: positive sizes only."""
    return Group(dict.fromkeys(keys, POSITIVE))


OPEN_CLIP_TINY = Group({
    "embed_dim": POSITIVE,
    "vision_cfg": sizes("image_size", "layers", "width", "patch_size", "head_width"),
    "text_cfg": sizes("context_length", "vocab_size", "width", "heads", "layers"),
})
IMAGE_ENCODER = {
    "backend": OneOf("open_clip", "clip", "vit"), "model": MODEL, "pretrained": Nullable(PATH),
    "tiny": OPEN_CLIP_TINY, "precision": PRECISION,
}

# The text model and optimiser every trainer shares; each other trainer's `fit:` overrides any of these.
TRAIN = Group(
    {
        "encoder": MODEL,
        "tiny": sizes("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
        "max_length": POSITIVE, "epochs": POSITIVE, "batch_size": POSITIVE,
        "lr": RATE, "head_lr": RATE, "weight_decay": WEIGHT, "warmup_ratio": UNIT, "max_grad_norm": RATE,
        "dropout": DROPOUT, "threads": COUNT,
        "precision": PRECISION, "grad_accum": POSITIVE, "group_by_length": Bool(),
        "length_chunk": POSITIVE, "loader_workers": COUNT, "patience": COUNT, "keep_last": COUNT,
    },
)
FIT = Group(TRAIN.fields, optional=TRAIN.fields)  # a trainer's overrides: any key of `train`, none required
GROUNDING = {  # what the grounded and index models share
    "fit": FIT, "init": INIT, "top_k": POSITIVE, "regions": Bool(), "global_feature": Bool(),
    "soft_label_threshold": UNIT, "captions": Bool(), "generated_image": Bool(),
}

SPEC = Group({
    "base": Group({"seed": SEED, "device": Device(), "data_root": PATH, "cache_root": PATH}),
    "sample": Group({"seed": SEED, "train": POSITIVE, "dev": COUNT, "test": COUNT, "image_size": Int(min=64)}),
    "prepare": Group({
        "format": OneOf("twitter-gmner", "conll-mner"),
        "files": Map(PATH, keys="split names"),
        "images_dir": PATH, "xml_dir": Nullable(PATH), "image_ext": Str(),
        "types": ListOf(Str("an entity type", empty=False)),
        "box_tolerance": Num(min=0),
        "policy": Group({reason: OneOf(*actions) for reason, actions in {
            "malformed_line": ("error", "skip"), "unknown_tag": ("error", "skip", "repair"),
            "orphan_inside": ("error", "repair"), "empty_tweet": ("error", "skip"), "duplicate_id": ("error", "skip"),
            "bad_encoding": ("error", "skip", "repair"), "bad_xml": ("error", "skip"),
            "name_not_in_tweet": ("error", "skip"), "bad_box": ("error", "skip"),
            "box_overhang": ("error", "skip", "repair"), "missing_image": ("error", "skip"),
            "bad_image": ("error", "skip"), "missing_file": ("error", "skip"), "empty_file": ("error", "skip"),
            "bad_id": ("error", "skip"), "token_whitespace": ("error", "repair"), "ambiguous_object": ("error", "skip"),
            "xml_size_mismatch": ("error", "skip", "repair"),
        }.items()}),
    }),
    "detect": Group({
        "backend": OneOf("selective_search", "torchvision", "zero_shot", "oracle"),
        "top_k": POSITIVE, "nms_iou": UNIT, "precision": PRECISION, "batch_size": POSITIVE, "num_workers": COUNT,
        **IMAGES,
        "selective_search": Group({
            "mode": OneOf("fast", "quality"), "base_k": POSITIVE, "inc_k": COUNT, "sigma": Num(min=0),
            "max_side": POSITIVE, "max_proposals": POSITIVE, "ranking": OneOf("learned", "none"), "l2": WEIGHT,
        }),
        "torchvision": Group({
            "arch": Str("a torchvision.models.detection builder", empty=False),
            "weights": Nullable(Str("a torchvision weights name or a state_dict path", empty=False)),
            "num_classes": POSITIVE, "categories": Nullable(ListOf(Str())),
            "options": Group(  # FasterRCNN keyword arguments
                {"min_size": POSITIVE, "max_size": POSITIVE, "rpn_score_thresh": UNIT},
                optional={"box_score_thresh": UNIT, "box_nms_thresh": UNIT, "box_detections_per_img": POSITIVE},
            ),
        }),
        "zero_shot": Group({
            "model": MODEL, "revision": Nullable(Str(empty=False)), "prompt": OneOf("labels", "tweet"),
            "labels": ListOf(Str(empty=False)), "template": Str(), "max_queries": POSITIVE, "max_text_len": POSITIVE,
            "tiny": sizes("vocab_size", "hidden_size", "layers", "heads", "image_size", "patch_size",
                          "max_text_len", "num_queries"),
        }),
    }),
    "caption": Group({
        "model": MODEL,
        "tiny": sizes("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                      "patch_size"),
        "precision": PRECISION, "batch_size": POSITIVE, "num_workers": COUNT,
        "generate": Group({  # BLIP generate() keyword arguments
            "max_new_tokens": POSITIVE, "num_beams": POSITIVE, "do_sample": Bool(), "repetition_penalty": RATE,
        }),
        **IMAGES,
    }),
    "synthesize": Group({
        "model": MODEL,
        "tiny": Group({
            "block_out_channels": ListOf(POSITIVE),
            **dict.fromkeys(("layers_per_block", "norm_num_groups", "attention_head_dim", "latent_size", "text_width",
                             "text_layers", "text_heads"), POSITIVE),
        }),
        "precision": PRECISION, "batch_size": POSITIVE, "steps": POSITIVE, "guidance_scale": Num(min=0),
        "size": POSITIVE, "negative_prompt": Str(), "tweet_prompt": Str(), "entity_prompt": Str(),
        "entity_images": Bool(), "theta": Num(-1, 1), "relevance": Group(IMAGE_ENCODER), "num_workers": COUNT,
        **IMAGES,
    }),
    "features": Group({
        **IMAGE_ENCODER, "batch_size": POSITIVE, "num_workers": COUNT, "patch_tokens": Bool(), "text": Bool(),
        **IMAGES,
        "masked": Group({
            "splits": ListOf(Str("a split name", empty=False)), "fill": OneOf("mean", "blur", "gray"),
            "blur_radius": RATE,
        }),
    }),
    "train": TRAIN,
    "evaluate": Group({
        "splits": ListOf(Str("a split name", empty=False)), "iou_threshold": UNIT, "regions": Nullable(PATH),
    }),
    "train_grounded": Group({
        **GROUNDING, "span_words": Bool(), "loss": OneOf("kl", "ce"), "weight": WEIGHT, "hidden": POSITIVE,
        "heads": POSITIVE, "connector": Bool(), "balance_weight": WEIGHT, "visual_tokens": Bool(),
    }),
    "pretrain": Group({
        "fit": FIT, "top_k": POSITIVE, "tia": Bool(), "eoa": Bool(), "t2i": Bool(), "sgla": Bool(),
        "coupling": Bool(), "objects": OneOf("linear", "connector"), "gate": Bool(), "negatives": Int(min=2),
        "temperature": RATE,
        "connector": Group({
            "graph": Bool(), "moe": Bool(), "graph_layers": POSITIVE, "n_experts": POSITIVE,
            "top_k_experts": POSITIVE, "dropout": DROPOUT,
        }),
        "weights": Group(dict.fromkeys(("tia", "eoa", "global", "local", "balance", "gate"), WEIGHT)),
    }),
    "train_index": Group({
        **GROUNDING, "model": MODEL,
        "tiny": sizes("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                      "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"),
        "head": OneOf("hierarchical", "flat"), "region_loss": OneOf("kl", "ce"), "region_weight": WEIGHT,
        "max_entities": POSITIVE, "beam_size": POSITIVE,
    }),
    "train_bga": Group({
        "fit": FIT, "top_k": POSITIVE, "hidden": POSITIVE, "loss": OneOf("infonce", "cosine", "both"),
        "temperature": RATE, "t2i_weight": WEIGHT, "i2t_weight": WEIGHT, "salience": Num(min=0),
        "text_target": Bool(), "stage_epochs": ListOf(POSITIVE), "thresholds": ListOf(Num(-1, 1)),
        "cycle_weight": WEIGHT, "inference": OneOf("generated", "text_only"), "generated_share": UNIT,
        "shuffle_images": Bool(),
    }),
    "train_vsgn": Group({
        "fit": FIT, "top_k": POSITIVE, "patches": Bool(), "captions": Bool(), "caption_length": Int(min=3),
        "vsg": Bool(), "fusion": OneOf("cir", "concat", "sum"), "graph_top_k": POSITIVE, "graph_layers": POSITIVE,
        "local_window": Nullable(POSITIVE), "lambda_align": WEIGHT, "hidden": POSITIVE, "heads": POSITIVE,
        "reduction": POSITIVE, "gamma": RATE, "beta_start": WEIGHT, "beta_end": WEIGHT, "beta_warmup": COUNT,
    }),
})
