"""torchvision Faster R-CNN family detectors (any builder in torchvision.models.detection)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torchvision.models import detection
from torchvision.transforms.functional import pil_to_tensor

from gmner.core.errors import ModelUnavailable
from gmner.core.hashing import digest
from gmner.core.model_refs import model_fingerprint
from gmner.vision.detectors.base import DetectorLoad, ImageRecord, RankedPerImage, autocast, select_top_k


class TorchvisionDetector(RankedPerImage):
    """``weights``: null = random weights from ``arch`` (boxes are meaningless: for the sample and tests),
    a torchvision weights name such as ``FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1`` (already in the torch
    hub cache, nothing is downloaded), or a local state_dict checkpoint of ``arch`` with ``num_classes``."""

    def __init__(self, cfg: dict, *, k: int, nms_iou: float, precision: str, device, seed: int, loader: DetectorLoad,
                 hash_memo: Path | None = None):
        self.k, self.nms_iou, self.precision, self.device, self.load = k, nms_iou, precision, device, loader
        builder = getattr(detection, cfg["arch"])
        # Every candidate is wanted, so no score floor; torchvision keeps at most this many per image.
        options = {"box_score_thresh": 0.0, "box_detections_per_img": max(k, 100), **cfg.get("options", {})}
        weights = cfg.get("weights")
        categories = cfg.get("categories")
        if weights is None:
            torch.manual_seed(seed)
            model = builder(weights=None, weights_backbone=None, num_classes=cfg["num_classes"], **options)
            model_fp = model_fingerprint(f"tiny-{cfg['arch']}", config={**cfg, "options": options}, seed=seed)
        elif Path(weights).expanduser().is_file():
            model = builder(weights=None, weights_backbone=None, num_classes=cfg["num_classes"], **options)
            model.load_state_dict(torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True))
            model_fp = digest(model_fingerprint(weights, hash_memo=hash_memo), cfg, options)
        else:
            try:
                enum = torchvision.models.get_weight(weights)
            except (ValueError, KeyError, AttributeError):
                raise ValueError(f"detect.torchvision.weights: {weights!r} is neither a file nor a torchvision "
                                 "weights name (such as FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1)") from None
            local = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            if not local.exists():
                raise ModelUnavailable(f"torchvision weights {weights!r} are not in {local.parent} and no download is "
                                       "possible here: copy the file there, or give a checkpoint path")
            model = builder(weights=enum, weights_backbone=None, **options)
            categories = categories or enum.meta["categories"]
            model_fp = digest("torchvision", weights, cfg["arch"], options)
        self.labels = list(categories) if categories else [f"class_{i}" for i in range(cfg["num_classes"])]
        self.model = model.eval().to(device)
        self.fingerprint = digest(model_fp, "rcnn", k, nms_iou, precision, loader.max_side)

    def item(self, image: ImageRecord):
        return image.sha256, (image.path, None)

    def __call__(self, batch: list) -> list[dict]:
        tensors = [pil_to_tensor(loaded.image).to(self.device, torch.float32) / 255 for loaded, _ in batch]
        with torch.inference_mode(), autocast(self.device, self.precision):
            outputs = self.model(tensors)
        results = []
        for (loaded, _), out in zip(batch, outputs):
            boxes = loaded.to_original(out["boxes"].float().cpu().numpy())
            labels = [self.labels[i] for i in out["labels"].tolist()]
            results.append(select_top_k(boxes, out["scores"].float().cpu().numpy(), labels, self.k, self.nms_iou))
        return results
