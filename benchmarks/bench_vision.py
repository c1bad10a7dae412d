"""Items/s of the caption, synthesize and features stages on generated sample tweets, cold and from the cache.

Run on a CPU with the tiny random-weight models of params.yaml:

    python benchmarks/bench_vision.py [--tweets N] [--threads T] [--workers W]

or at real model sizes (random weights, no hub needed) on a GPU machine:

    python benchmarks/bench_vision.py --real --device cuda --precision bf16 --tweets 256

``--real`` means BLIP-base (ViT-B/16 at 384 px, 12-layer decoder), Stable Diffusion 1.x (UNet 320-1280
channels, CLIP-L text encoder, 512 px) and open_clip ViT-B/16 at 224 px. Items are distinct images for
caption, distinct prompts for synthesize (the relevance pass is reported beside it) and every embedded item
(images, regions, generated images, texts) for features. Regions come from the oracle detector.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from gmner.core.params import load_params
from gmner.datasets import prepare, sample
from gmner.vision import caption, detect, features, synthesize

REPO = Path(__file__).resolve().parents[1]

BLIP_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "image_size": 384, "patch_size": 16}
SD_1X = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "norm_num_groups": 32,
         "attention_head_dim": 8, "latent_size": 64, "text_width": 768, "text_layers": 12, "text_heads": 12,
         "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
         "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
         "vae_block_out_channels": [128, 256, 512, 512], "vae_layers_per_block": 2}


def configure(params: dict, args) -> dict:
    params = copy.deepcopy(params)
    for group in ("caption", "synthesize", "features"):
        params[group].update(precision=args.precision, num_workers=args.workers)
        if args.batch_size:
            params[group]["batch_size"] = args.batch_size
    params["synthesize"]["relevance"]["precision"] = args.precision
    params["synthesize"]["steps"] = args.steps
    if args.real:
        params["caption"]["tiny"] = BLIP_BASE
        params["synthesize"].update(tiny=SD_1X, size=512)
        open_clip = {"backend": "open_clip", "model": "ViT-B-16", "pretrained": None}
        params["synthesize"]["relevance"].update(open_clip)
        params["features"].update(open_clip)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tweets", type=int, default=48, help="train tweets to generate (about 95 %% have images)")
    parser.add_argument("--image-size", type=int, default=320, help="long side of the generated sample images")
    parser.add_argument("--real", action="store_true", help="real model sizes (BLIP-base, SD 1.x, ViT-B/16 224 px)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of synthesize")
    parser.add_argument("--batch-size", type=int, default=0, help="override every stage's batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--stages", nargs="+", default=["caption", "synthesize", "features"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_root = root / "data" / "sample"
        sample.generate(data_root, seed=0, sizes={"train": args.tweets}, image_size=args.image_size)
        defaults = load_params(REPO / "params.yaml")
        params = configure(defaults, args)
        params["base"].update(data_root=str(data_root), cache_root=".cache", device=args.device)
        params["prepare"]["files"] = {"train": "train.txt"}
        params["detect"]["backend"] = "oracle"
        prepare.run_stage(params, root / "data" / "prepared")
        detect.run_stage(params, root)
        if "features" in args.stages and "synthesize" not in args.stages:
            # features reads the generated images: make them, untimed, with the tiny pipeline.
            synthesize.run_stage({**params, "synthesize": defaults["synthesize"]}, root)
        print(f"{'stage':<26}{'items':>7}{'model calls':>13}{'cold items/s':>14}{'cached items/s':>16}")
        for name in args.stages:
            stage = {"caption": caption, "synthesize": synthesize, "features": features}[name]
            (cold, cold_s), (warm, warm_s) = _timed(stage, params, root), _timed(stage, params, root)
            parts = _parts(name, cold, warm)
            items = sum(a["items"] for a, _ in parts.values())
            # Whole stage (model loading included), then the runner's passes alone.
            print(f"{name:<26}{items:>7}{cold['model_calls']:>13}"
                  f"{_rate(items, cold_s):>14.1f}{_rate(items, warm_s):>16.1f}")
            for label, (a, b) in parts.items():
                print(f"  {label:<24}{a['items']:>7}{a['model_calls']:>13}"
                      f"{_rate(a['items'], a['wall_s']):>14.1f}{_rate(b['items'], b['wall_s']):>16.1f}")


def _timed(stage, params: dict, root: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = stage.run_stage(params, root)
    return summary, time.perf_counter() - start


def _rate(items: int, seconds: float) -> float:
    return items / max(seconds, 1e-3)  # summaries round wall times to milliseconds


def _parts(name: str, cold: dict, warm: dict) -> dict:
    """label -> (cold, cached) runner summaries of the stage's passes."""
    if name == "caption":
        return {"images": (cold, warm)}
    passes = ("generate", "relevance") if name == "synthesize" else ("images", "regions", "generated", "text")
    return {p: (cold[p], warm[p]) for p in passes}


if __name__ == "__main__":
    main()
