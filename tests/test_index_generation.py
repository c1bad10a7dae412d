"""The index-generation model: target sequences, constrained decoding, encoder masks, save / load, training."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gmner.core.params import seed_everything
from gmner.models.index_generation import IndexGenerator
from gmner.models.pointer_decoding import (
    EOS,
    NO_REGION,
    Constraints,
    Entity,
    Layout,
    allowed,
    beam_decode,
    build_target,
    greedy_decode,
    parse_sequence,
)
from gmner.models.predictor import load
from gmner.models.visual_model import VisualPredictor
from gmner.models.visual_store import VisualStore
from gmner.training.index import IndexTrainingSet, build_model, run_stage

from helpers import DIM, K, repo_params, tiny_dataset, write_splits, write_tables

CFG = {"max_length": 32, "dropout": 0.0, "epochs": 1, "batch_size": 4, "lr": 1e-3, "head_lr": 1e-2,
       "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 1.0}
GROUP = {
    "model": "tiny",
    "tiny": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
             "max_position_embeddings": 64},
    "top_k": K, "max_entities": 4,
}


def _model(tweets, **overrides) -> IndexGenerator:
    seed_everything(0)
    return build_model(CFG, {**GROUP, **overrides}, tweets, DIM)


def test_target_round_trip():
    layout = Layout(n_types=3, n_words=6, n_regions=2)
    entities = [Entity(0, 1, 2, None), Entity(2, 2, 0, 1), Entity(4, 5, 1, 0)]
    seq = build_target(entities[::-1], layout)  # any input order; the sequence is ordered by start
    assert seq == [5, 6, 4, NO_REGION, 7, 7, 2, 12, 9, 10, 3, 11, EOS]
    assert parse_sequence(seq, layout) == entities
    assert build_target([], layout) == [EOS]
    with pytest.raises(ValueError, match="overlaps"):
        build_target([Entity(0, 2, 0, None), Entity(2, 3, 0, None)], layout)
    with pytest.raises(ValueError, match="inside an entity"):
        parse_sequence(seq[:3], layout)


def _random_step(seed: int, size: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda tweets, prefixes: torch.randn((len(prefixes), size), generator=generator) * 5


def _check_valid(seq, layout, rules):
    for i, symbol in enumerate(seq):
        assert allowed(seq[:i], layout, rules)[symbol], (seq, i)
    assert seq[-1] == EOS
    entities = parse_sequence(seq, layout)
    assert len(entities) <= rules.max_entities
    for previous, entity in zip([None] + entities, entities):
        assert entity.start <= entity.end < rules.n_words
        assert previous is None or entity.start > previous.end
        assert entity.region is None or rules.region_valid[entity.region]


@pytest.mark.parametrize("seed", range(5))
def test_decoding_from_random_logits_gives_only_valid_sequences(seed):
    layout = Layout(n_types=4, n_words=9, n_regions=3)
    rules = [Constraints(9, np.array([True, False, True]), 3), Constraints(4, np.zeros(3, bool), 2),
             Constraints(0, np.ones(3, bool), 5), Constraints(9, np.ones(3, bool), 1)]
    greedy = greedy_decode(_random_step(seed, layout.size), layout, rules)
    beam = beam_decode(_random_step(seed, layout.size), layout, rules, beam_size=3)
    for seqs in (greedy, beam):
        for seq, r in zip(seqs, rules):
            _check_valid(seq, layout, r)
    assert greedy[2] == beam[2] == [EOS]  # no words: nothing to point at


def test_beam_of_one_is_greedy():
    layout = Layout(n_types=2, n_words=7, n_regions=2)
    rules = [Constraints(7, np.array([True, True]), 4)] * 6
    weights = torch.randn(layout.size, layout.size, generator=torch.Generator().manual_seed(3))

    def step(tweets, prefixes):  # depends on the prefix, as a decoder does
        last = torch.tensor([p[-1] if p else 0 for p in prefixes])
        return weights[last] + tweets[:, None].float()

    assert beam_decode(step, layout, rules, beam_size=1) == greedy_decode(step, layout, rules)


def test_encoder_inputs_mask_missing_regions():
    tweets, *tables = tiny_dataset()
    model = _model(tweets).eval()
    data = IndexTrainingSet(model, tweets, VisualStore(*tables, top_k=K))
    batch = data.batch([0, 1, 2, 3])  # no image, null features, two usable images
    inputs = model.encoder_inputs(batch)
    length = batch["input_ids"].shape[1]
    assert inputs["embeds"].shape == (4, length + 2 + K, 16) and inputs["mask"].shape == (4, length + 2 + K)
    rows = torch.arange(4)[:, None]
    assert inputs["mask"][rows, inputs["region_slots"]].tolist() == [[False] * K] * 2 + [[True] * K] * 2
    image_slot, generated_slot = inputs["region_slots"][:, 0] - 2, inputs["region_slots"][:, 0] - 1
    assert inputs["mask"][torch.arange(4), image_slot].tolist() == [False, False, True, True]
    assert not inputs["mask"][torch.arange(4), generated_slot].any()  # generated_image is off
    visual = inputs["mask"].sum(dim=1) - batch["attention_mask"].sum(dim=1)
    assert visual.tolist() == [0, 0, 1 + K, 1 + K]
    # Whatever sits in masked slots changes nothing.
    states = model.encode_batch(batch)
    noisy = {key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()}
    noisy["region_features"][:2] = 1e3
    noisy["image_features"][:2] = -1e3
    assert torch.allclose(model.encode_batch(noisy)["words"][:2], states["words"][:2])
    # Ungroundable everywhere without candidates: region targets of tweets 0 and 1 are NO_REGION.
    assert [e.region for e in batch["entities"][0] + batch["entities"][1]] == [None] * 4
    assert [e.region for e in batch["entities"][2]] == [0, None]


@pytest.mark.slow
def test_training_lowers_the_loss_and_save_load_predicts_identically(tmp_path, monkeypatch):
    tweets, *tables = tiny_dataset()
    store = VisualStore(*tables, top_k=K)
    model = _model(tweets)
    data = IndexTrainingSet(model, tweets, store)
    batch = data.batch(list(range(len(data))))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = model.loss(batch).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 3

    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["kind"] == "index_generation"
    write_tables(tmp_path, tables)
    monkeypatch.chdir(tmp_path)  # the loaded predictor reads the tables relative to the working directory
    before = VisualPredictor(model.eval(), store).predict(tweets)
    loaded = load(tmp_path / "model")
    assert isinstance(loaded.model, IndexGenerator) and loaded.model.types == ["LOC", "PER"]
    assert loaded.predict(tweets, tables[0]).equals(before)
    entities = before.column("entities").to_pylist()
    # Trained to the gold: Ann Lee (PER) on the candidate drawn, Oslo (LOC) never grounded, no image -> none.
    assert [(e["start"], e["end"], e["type"]) for e in entities[3]] == [(1, 3, "PER"), (4, 5, "LOC")]
    assert [e["region"] for e in entities[3]] == [1, None] and [e["region"] for e in entities[0]] == [None, None]

    loaded.model.visual_cfg = replace(loaded.model.visual_cfg, beam_size=3)
    beam = loaded.predict(tweets).column("entities").to_pylist()
    assert [(e["start"], e["end"], e["type"], e["region"]) for e in beam[3]] == [(1, 3, "PER", 1), (4, 5, "LOC", None)]


@pytest.mark.slow
def test_stage_writes_the_model_and_its_summary(tmp_path):
    tweets, *tables = tiny_dataset()
    write_tables(write_splits(tmp_path, {"train": tweets, "dev": tweets}), tables)
    params = repo_params("train.epochs=1", "train.threads=0", "train.max_length=32")
    params["train_index"].update(GROUP)
    run_stage(params, tmp_path)
    summary = json.loads((tmp_path / "models" / "index" / "train_summary.json").read_text())
    assert summary["train_targets"]["candidate_target"] == 6 and summary["train_visual"]["only_none"] == 2
    assert summary["train_sequences"] == {"spans_beyond_max_entities": 0}
    assert (tmp_path / "models" / "index" / "model.json").is_file()
