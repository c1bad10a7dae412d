"""Vision models for the per-item stages: BLIP captioner, Stable Diffusion pipeline, image/text encoders.

Every model reference is resolved by :func:`gmner.core.model_refs.resolve_model` (``"tiny"``, a local folder,
or a cached hub id) and each loaded model carries the fingerprint it gives (plus the precision), so per-item
caches are keyed by what the model is.

Every model call has the same number of rows (:func:`fixed_batches`), which makes an item's result
independent of the items computed beside it: incremental, sharded and from-scratch runs give the same bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from gmner.core.errors import ModelUnavailable
from gmner.core.hashing import digest
from gmner.core.model_refs import TINY, ModelRef, check_tokenizer, load_from_folder, model_fingerprint, resolve_model

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# BLIP's tiny WordPiece vocabulary: BERT's special tokens, BLIP's decoder start token, then characters.
_BLIP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def torch_dtype(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}") from None


def fixed_batches(inputs: Sequence, rows: int | None, run: Callable[[list], Sequence]) -> list:
    """``run`` over chunks of exactly ``rows`` inputs (the last padded with copies of its first), results trimmed.

    Floating-point kernels choose their blocking by shape, so an item's result can change in its last bits
    with the number of items computed beside it. When every call has the same shape and rows do not interact,
    an item's result does not depend on its batch companions: a run that computes only new items gives the
    same bytes as a from-scratch run. ``rows`` None: one call over everything.
    """
    if not rows:
        return list(run(list(inputs)))
    out: list = []
    for start in range(0, len(inputs), rows):
        chunk = list(inputs[start : start + rows])
        out.extend(list(run(chunk + [chunk[0]] * (rows - len(chunk))))[: len(chunk)])
    return out


def _seeded(seed: int, build: Callable):
    # Random init from a private RNG state: the same seed gives the same weights wherever it is called.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class _LazyModel:
    """A model from ``spec["model"]`` (``tiny``: built from ``spec["tiny"]``) in ``spec["precision"]`` on ``device``.

    The reference is resolved (and fingerprinted) at once; the weights load on the first call, so a run
    whose items are all cached never loads them. ``where`` names the param in errors (default: ``param``).
    """

    param: str

    def __init__(self, spec: dict, seed: int, device: torch.device, *, where: str | None = None,
                 hash_memo: str | Path | None = None):
        self.spec, self.seed, self.device, self.where = spec, seed, device, where or self.param
        self.dtype = torch_dtype(spec["precision"])
        self.ref = resolve_model(spec["model"], self.where, tiny=spec.get("tiny"), seed=seed, hash_memo=hash_memo)
        self.fingerprint = digest(self.ref.fingerprint, spec["precision"])


# ---------------------------------------------------------------------------------------------- captioner


class Captioner(_LazyModel):
    """BLIP (see :class:`_LazyModel`)."""

    param = "caption.model"

    @functools.cached_property
    def parts(self):
        """(model, processor), loaded on first use."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if self.ref.folder is None:
            tiny = self.spec["tiny"]
            processor = _tiny_blip_processor(tiny["image_size"])
            config = _tiny_blip_config(tiny, processor.tokenizer)
            model = _seeded(self.seed, lambda: BlipForConditionalGeneration(config))
        else:
            processor = load_from_folder(self.where, self.ref, BlipProcessor.from_pretrained)
            check_tokenizer(self.where, self.ref.folder, processor.tokenizer)
            model = load_from_folder(self.where, self.ref, BlipForConditionalGeneration.from_pretrained)
        return model.to(device=self.device, dtype=self.dtype).eval(), processor

    def __call__(self, images: list, rows: int | None = None, **generate) -> list[str]:
        """One caption per PIL image, in calls of ``rows`` images (see :func:`fixed_batches`); ``generate``
        holds generation params (max_new_tokens, num_beams, ...)."""
        return fixed_batches(images, rows, lambda chunk: self._caption(chunk, generate))

    @torch.inference_mode()
    def _caption(self, images: list, generate: dict) -> list[str]:
        model, processor = self.parts
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=pixels.to(self.device, self.dtype), **generate)
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def _tiny_blip_processor(image_size: int):
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokens = list(_BLIP_SPECIALS) + list(_CHARS) + [f"##{c}" for c in _CHARS]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, bos_token="[DEC]")
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def _tiny_blip_config(tiny: dict, tokenizer):
    from transformers import BlipConfig

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    shared = {k: tiny[k] for k in keys}
    text = dict(
        shared,
        vocab_size=len(tokenizer),
        encoder_hidden_size=tiny["hidden_size"],
        max_position_embeddings=512,  # bounds max_new_tokens
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # BLIP's vision default init (std 1e-10) would make every image look the same to a random model.
    vision = dict(shared, image_size=tiny["image_size"], patch_size=tiny["patch_size"], initializer_range=0.02)
    width = tiny["hidden_size"]
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=width, image_text_hidden_size=width)


# --------------------------------------------------------------------------------------- text-to-image


class TextToImage(_LazyModel):
    """A StableDiffusionPipeline (see :class:`_LazyModel`)."""

    param = "synthesize.model"

    @functools.cached_property
    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        if self.ref.folder is None:
            pipeline = _seeded(self.seed, lambda: _tiny_stable_diffusion(self.spec["tiny"]))
            if self.dtype != torch.float32:
                pipeline = pipeline.to(dtype=self.dtype)
        else:
            pipeline = load_from_folder(
                self.where, self.ref, StableDiffusionPipeline.from_pretrained, dtype=self.dtype,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            check_tokenizer(self.where, self.ref.folder, pipeline.tokenizer)
        pipeline = pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def __call__(self, prompts: list[str], seeds: list[int], rows: int | None = None,
                 negative_prompt: str | None = None, **options) -> list:
        """One PIL image per prompt, each from its own seeded generator, in calls of ``rows`` prompts
        (see :func:`fixed_batches`): an image depends on its prompt and seed only. ``options`` go to the
        pipeline (num_inference_steps, guidance_scale, height, width)."""
        if negative_prompt:
            options["negative_prompt"] = [negative_prompt] * (rows or len(prompts))
        return fixed_batches(list(zip(prompts, seeds)), rows, lambda chunk: self._generate(chunk, options))

    def _generate(self, chunk: list[tuple[str, int]], options: dict) -> list:
        prompts, seeds = zip(*chunk)
        # Initial latents come from CPU generators: the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return self.pipeline(list(prompts), generator=generators, output_type="pil", **options).images


def clip_bpe_tokenizer(context_length: int = 77):
    """CLIP's real BPE tokenizer (49408 tokens) as a transformers CLIPTokenizer, from open_clip's bundled vocab."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    start, end = "<start_of_text>", "<end_of_text>"
    return CLIPTokenizer(
        vocab=bpe.encoder, merges=merges, bos_token=start, eos_token=end, unk_token=end, pad_token=end,
        model_max_length=context_length,
    )


def _tiny_stable_diffusion(tiny: dict):
    """A random-weight pipeline from ``tiny``; optional keys (``down_block_types``, ``up_block_types``,
    ``vae_block_out_channels``, ``vae_layers_per_block``) also describe full-size Stable Diffusion layouts."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    channels, groups, width = tuple(tiny["block_out_channels"]), tiny["norm_num_groups"], tiny["text_width"]
    vae_channels = tuple(tiny.get("vae_block_out_channels", channels))
    tokenizer = clip_bpe_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=tiny["text_layers"], num_attention_heads=tiny["text_heads"], max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    attended = len(channels) - 1  # default layout: cross-attention in every block but the first
    unet = UNet2DConditionModel(
        sample_size=tiny["latent_size"], in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=tiny["layers_per_block"], norm_num_groups=groups, cross_attention_dim=width,
        down_block_types=tiny.get("down_block_types", ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * attended),
        up_block_types=tiny.get("up_block_types", ("CrossAttnUpBlock2D",) * attended + ("UpBlock2D",)),
        attention_head_dim=tiny["attention_head_dim"],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels, norm_num_groups=groups,
        layers_per_block=tiny.get("vae_layers_per_block", 1),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------- image encoders


class ImageEncoder:
    """Image embeddings, patch tokens of the last layer, and text embeddings where the model has text.

    Subclasses wrap one backend; ``dim`` is the embedding width, ``token_shape`` the (patches, width) of
    the patch tokens, ``has_text`` whether :meth:`texts` works. Embeddings are not normalised.
    """

    backend: str
    dim: int
    token_shape: tuple[int, int]
    has_text: bool
    fingerprint: str
    preprocess: Callable[[list], torch.Tensor]  # PIL images -> [N, 3, H, W]; picklable, runs in DataLoader workers

    def images(self, pixels: torch.Tensor, rows: int | None = None,
               tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeddings [N, dim], patch tokens [N, patches, width] or None without ``tokens``)``, float32 on
        the CPU, of ``pixels`` [N, 3, H, W] computed in calls of ``rows`` (see :func:`fixed_batches`)."""
        pairs = fixed_batches(list(pixels), rows, lambda chunk: list(zip(*self._images(torch.stack(chunk)))))
        pooled = torch.stack([p for p, _ in pairs])
        return pooled, torch.stack([t for _, t in pairs]) if tokens else None

    def texts(self, texts: list[str], rows: int | None = None) -> torch.Tensor:
        """Text embeddings ``[N, dim]``, float32 on the CPU, in calls of ``rows`` texts."""
        if not self.has_text:
            raise NotImplementedError(f"the {self.backend} backend has no text tower; use open_clip or clip")
        return torch.stack(fixed_batches(texts, rows, self._texts))

    def _images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class _OpenClip(ImageEncoder):
    backend = "open_clip"
    has_text = True

    def __init__(self, model, transform, tokenizer, device, dtype, fingerprint):
        self.model, self.preprocess, self.tokenizer = model, BatchedCompose.split(transform), tokenizer
        self.device, self.dtype, self.fingerprint = device, dtype, fingerprint
        model.visual.output_tokens = True
        size = model.visual.image_size
        probe = torch.zeros(1, 3, *(size if isinstance(size, tuple) else (size, size)))
        pooled, tokens = self._images(probe)
        self.dim, self.token_shape = pooled.shape[-1], tuple(tokens.shape[1:])

    @torch.inference_mode()
    def _images(self, pixels):
        pooled, tokens = self.model.visual(pixels.to(self.device, self.dtype))
        return pooled.float().cpu(), tokens.float().cpu()

    @torch.inference_mode()
    def _texts(self, texts):
        # The tokenizer pads to the context length: every call has the same shape.
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


class _HFVision(ImageEncoder):
    """transformers CLIPModel (``backend: clip``) or ViTModel (``backend: vit``, image only)."""

    def __init__(self, backend, model, processor, device, dtype, fingerprint):
        self.backend, self.model, self.processor = backend, model, processor
        self.device, self.dtype, self.fingerprint = device, dtype, fingerprint
        self.has_text = backend == "clip"
        self.preprocess = functools.partial(_pixels, processor.image_processor)
        vision = model.config.vision_config if self.has_text else model.config
        patches = (vision.image_size // vision.patch_size) ** 2
        self.dim = model.config.projection_dim if self.has_text else vision.hidden_size
        self.token_shape = (patches, vision.hidden_size)

    @torch.inference_mode()
    def _images(self, pixels):
        pixels = pixels.to(self.device, self.dtype)
        if self.has_text:
            out = self.model.get_image_features(pixel_values=pixels)
            pooled = out.pooler_output  # projected into the joint image-text space
        else:
            out = self.model(pixel_values=pixels)
            pooled = out.last_hidden_state[:, 0]  # [CLS] after the final layer norm
        return pooled.float().cpu(), out.last_hidden_state[:, 1:].float().cpu()

    @torch.inference_mode()
    def _texts(self, texts):
        # Padding to the context length, not to the longest text, keeps every call the same shape.
        batch = self.processor.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        return self.model.get_text_features(**batch.to(self.device)).pooler_output.float().cpu()


def embed_images(encoder: ImageEncoder, pixels: list[torch.Tensor], rows: int | None,
                 tokens: bool = False) -> list[dict]:
    """Runner results of a batch of preprocessed images: ``{"embedding"}`` (and ``"tokens"``) arrays each."""
    pooled, patches = encoder.images(torch.stack(pixels), rows, tokens)
    if not tokens:
        return [{"embedding": e} for e in pooled.numpy()]
    return [{"embedding": e, "tokens": t} for e, t in zip(pooled.numpy(), patches.numpy())]


def _pixels(image_processor, images: list) -> torch.Tensor:
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


@dataclass(frozen=True)
class BatchedCompose:
    """A torchvision Compose over PIL images (open_clip's preprocessing) whose tensor steps run once per batch.

    The steps before ``ToTensor`` (resize, crop, mode) run per image; ``ToTensor`` (uint8 -> float / 255) and
    the steps after it (``Normalize``) are elementwise, so running them once on the stacked batch gives exactly
    the per-image values for less: the features stage preprocesses up to top_k region crops an image at once.
    """

    per_image: Callable  # PIL image -> PIL image of the model's size
    per_batch: Callable  # [N, 3, H, W] float in [0, 1] -> model input

    @classmethod
    def split(cls, compose) -> BatchedCompose:
        from torchvision.transforms import Compose, ToTensor

        steps = list(getattr(compose, "transforms", ()))
        at = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
        if at is None:
            raise ValueError(f"expected a torchvision Compose with a ToTensor step, got {compose!r}")
        return cls(Compose(steps[:at]), Compose(steps[at + 1 :]))

    def __call__(self, images: list) -> torch.Tensor:
        arrays = np.stack([np.asarray(self.per_image(image), dtype=np.uint8) for image in images])
        if arrays.ndim == 3:  # a single-channel image mode
            arrays = arrays[..., None]
        pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).to(torch.float32).div_(255)
        return self.per_batch(pixels)


BACKENDS = ("open_clip", "clip", "vit")


def load_image_encoder(spec: dict, seed: int, device: torch.device, *, where: str,
                       hash_memo: str | Path | None = None) -> ImageEncoder:
    """An image (and text) encoder from ``spec``: ``backend`` (open_clip, clip, vit), ``model``, ``precision``.

    ``model: tiny`` builds random weights from ``spec["tiny"]``, an open_clip model config (``embed_dim``,
    ``vision_cfg``, ``text_cfg``), whose sizes the clip / vit backends also follow. For open_clip a
    non-tiny ``model`` is ``local-dir:<folder>``, ``hf-hub:<id>`` (from the local cache), or an
    architecture name (``ViT-B-16``) with ``pretrained`` a weights file, or no ``pretrained`` for seeded
    random weights (timing runs). For clip / vit it is a local folder or a cached hub id.
    """
    backend = spec["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend {backend!r} is not one of {BACKENDS}")
    dtype = torch_dtype(spec["precision"])
    if backend == "open_clip":
        model, preprocess, tokenizer, fingerprint = _open_clip(spec, seed, where, hash_memo)
        model = model.to(device=device, dtype=dtype).eval()
        return _OpenClip(model, preprocess, tokenizer, device, dtype, digest(fingerprint, spec["precision"]))
    ref = resolve_model(spec["model"], where, tiny=spec.get("tiny"), seed=seed, hash_memo=hash_memo)
    if ref.folder is None:
        model, processor = _tiny_hf_vision(backend, spec["tiny"], seed)
    else:
        model, processor = _hf_vision(backend, ref, where)
    model = model.to(device=device, dtype=dtype).eval()
    return _HFVision(backend, model, processor, device, dtype, digest(backend, ref.fingerprint, spec["precision"]))


def _open_clip(spec: dict, seed: int, where: str, hash_memo):
    """(model, preprocess, tokenizer, fingerprint) for an open_clip reference."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    ref, pretrained = spec["model"], spec.get("pretrained")
    if ref == TINY:
        config = spec["tiny"]
        model = _seeded(seed, lambda: open_clip.CLIP(**config))
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        tokenizer = SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
        return model, preprocess, tokenizer, model_fingerprint(ref, config=config, seed=seed)
    for prefix in ("local-dir:", "hf-hub:"):
        if ref.startswith(prefix):
            folder = resolve_model(ref[len(prefix):], where, hash_memo=hash_memo)
            name, pretrained, fingerprint = f"local-dir:{folder.folder}", None, folder.fingerprint
            break
    else:
        name = ref
        if pretrained is None:
            fingerprint = digest("open_clip-random", ref, seed)
        elif Path(pretrained).is_file():
            fingerprint = digest("open_clip", ref, model_fingerprint(pretrained, hash_memo=hash_memo))
        else:
            raise ModelUnavailable(
                f"{where}: pretrained {pretrained!r} is not a weights file; open_clip tags need a model hub, "
                "which is not reachable from here: download the weights and pass their file"
            )
    try:
        model, _, preprocess = _seeded(seed, lambda: open_clip.create_model_and_transforms(name, pretrained=pretrained))
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelUnavailable(f"{where}: cannot load open_clip model {ref!r}: {err}") from err
    return model, preprocess, tokenizer, fingerprint


def _tiny_hf_vision(backend: str, tiny: dict, seed: int):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    vis, txt = tiny["vision_cfg"], tiny["text_cfg"]
    vision = dict(
        image_size=vis["image_size"], patch_size=vis["patch_size"], hidden_size=vis["width"],
        num_hidden_layers=vis["layers"], num_attention_heads=vis["width"] // vis.get("head_width", 64),
        intermediate_size=4 * vis["width"],
    )
    size = {"height": vis["image_size"], "width": vis["image_size"]}
    if backend == "vit":
        model = _seeded(seed, lambda: ViTModel(ViTConfig(**vision), add_pooling_layer=False))
        return model, _ImageOnly(ViTImageProcessor(size=size))
    tokenizer = clip_bpe_tokenizer(txt["context_length"])
    text = dict(
        vocab_size=len(tokenizer), hidden_size=txt["width"], num_hidden_layers=txt["layers"],
        num_attention_heads=txt["heads"], intermediate_size=4 * txt["width"],
        max_position_embeddings=txt["context_length"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=tiny["embed_dim"])
    model = _seeded(seed, lambda: CLIPModel(config))
    images = CLIPImageProcessor(size={"shortest_edge": vis["image_size"]}, crop_size=size)
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def _hf_vision(backend: str, ref: ModelRef, where: str):
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

    if backend == "vit":
        processor = _ImageOnly(load_from_folder(where, ref, ViTImageProcessor.from_pretrained))
        return load_from_folder(where, ref, ViTModel.from_pretrained, add_pooling_layer=False), processor
    processor = load_from_folder(where, ref, CLIPProcessor.from_pretrained)
    check_tokenizer(where, ref.folder, processor.tokenizer)
    return load_from_folder(where, ref, CLIPModel.from_pretrained), processor


@dataclass
class _ImageOnly:
    """The ``image_processor`` slot of a processor, for image-only models."""

    image_processor: object
