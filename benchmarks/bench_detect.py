"""Items/s of the detect stage on CPU for each backend, on generated sample images, cold and from the cache.

Run: python benchmarks/bench_detect.py [--tweets N] [--image-size PX] [--threads T] [--workers W].
The tiny random-weight models measure the pipeline (decode, batching, post-processing, caching), not the
speed of a real OWLv2 or Faster R-CNN, which is far slower per image on a CPU. Selective search is the real
algorithm at any size; its rows include the proposal scorer's fit and ranking (cached runs redo them).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from gmner.core.params import load_params
from gmner.datasets import prepare, sample
from gmner.vision.detect import run_stage

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {
    "selective_search": {},
    "selective_search quality": {"selective_search": {"mode": "quality"}},
    "oracle": {},
    "torchvision": {},
    "zero_shot owlv2": {"zero_shot": {"model": "tiny-owlv2"}},
    "zero_shot grounding-dino": {"zero_shot": {"model": "tiny-grounding-dino"}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tweets", type=int, default=64, help="train tweets to generate (about 95 %% have images)")
    parser.add_argument("--image-size", type=int, default=320, help="long side of the generated images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_root = root / "data" / "sample"
        sample.generate(data_root, seed=0, sizes={"train": args.tweets}, image_size=args.image_size)
        params = copy.deepcopy(base)
        params["base"].update(data_root=str(data_root), cache_root=str(root / ".cache"), device="cpu")
        params["prepare"]["files"] = {"train": "train.txt"}
        prepare.run_stage(params, root / "data" / "prepared")
        print(f"{'backend':<26}{'images':>8}{'cold items/s':>14}{'cached items/s':>16}")
        for name, overrides in BACKENDS.items():
            run = copy.deepcopy(params)
            run["detect"].update(backend=name.split()[0], num_workers=args.workers)
            for group, values in overrides.items():
                run["detect"][group].update(values)
            cold = run_stage(run, root)
            warm = run_stage(run, root)
            print(f"{name:<26}{cold['items']:>8}{cold['items_per_s']:>14.1f}{warm['items_per_s']:>16.1f}")


if __name__ == "__main__":
    main()
