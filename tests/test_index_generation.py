"""The index-generation model: target sequences, constrained decoding, encoder masks, save / load, training."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gmner.core.params import ParamError, seed_everything
from gmner.models.index_generation import IndexGenerator, build_bart
from gmner.models.losses import grounding_loss
from gmner.models.pointer_decoding import (
    EOS,
    GROUNDABLE,
    NO_REGION,
    UNGROUNDABLE,
    Constraints,
    Entity,
    Layout,
    allowed,
    beam_decode,
    build_target,
    greedy_decode,
    parse_sequence,
    region_steps,
)
from gmner.models.predictor import load
from gmner.models.visual_model import VisualPredictor
from gmner.models.visual_store import VisualStore
from gmner.pretrain.checkpoint import read_checkpoint
from gmner.training.index import IndexTrainingSet, build_model, index_config, run_stage
from gmner.training.loop import param_groups
from gmner.training.pretrain import build_model as build_alignment

from helpers import DIM, K, repo_params, tiny_dataset, write_splits, write_tables

CFG = {"max_length": 32, "dropout": 0.0, "epochs": 1, "batch_size": 4, "lr": 1e-3, "head_lr": 1e-2,
       "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 1.0}
GROUP = {
    "model": "tiny",
    "tiny": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
             "max_position_embeddings": 64},
    "top_k": K, "max_entities": 4, "init": "none",
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


def test_hierarchical_target_round_trip_for_every_indicator():
    layout = Layout(n_types=3, n_words=6, n_regions=2, head="hierarchical")
    entities = [Entity(0, 1, 2, None), Entity(2, 2, 0, 1), Entity(4, 5, 1, 0)]
    seq = build_target(entities[::-1], layout)
    # [EOS, GROUNDABLE, UNGROUNDABLE, 3 types] then words from 6: start, end, indicator, type per entity.
    assert seq == [6, 7, UNGROUNDABLE, 5, 8, 8, GROUNDABLE, 3, 10, 11, GROUNDABLE, 4, EOS]
    assert layout.size == 12  # regions are no symbols
    # The region is read at the decoder input that IS the indicator: positions of [BOS] + seq.
    assert region_steps(seq, layout) == [7, 11] and ([None] + seq)[7] == GROUNDABLE
    assert parse_sequence(seq, layout, regions=[1, 0]) == entities
    with pytest.raises(ValueError, match="without a chosen region"):
        parse_sequence(seq, layout, regions=[1])
    with pytest.raises(ValueError, match="more regions"):
        parse_sequence(seq, layout, regions=[1, 0, 1])
    with pytest.raises(ValueError, match="not an indicator"):
        parse_sequence([6, 7, 4, 5, EOS], layout)
    rules = Constraints(6, np.zeros(2, bool), 3)
    indicator = allowed(seq[:2], layout, rules)  # no usable candidate: only UNGROUNDABLE
    assert indicator.nonzero()[0].tolist() == [UNGROUNDABLE]
    assert allowed(seq[:2], layout, Constraints(6, np.array([False, True]), 3)).nonzero()[0].tolist() == [1, 2]
    assert allowed(seq[:3], layout, rules).nonzero()[0].tolist() == [3, 4, 5]  # then a type


def _random_step(seed: int, size: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda tweets, prefixes: torch.randn((len(prefixes), size), generator=generator) * 5


def _check_valid(seq, layout, rules):
    for i, symbol in enumerate(seq):
        assert allowed(seq[:i], layout, rules)[symbol], (seq, i)
    assert seq[-1] == EOS
    grounded = len(region_steps(seq, layout))
    assert not grounded or rules.region_valid.any()
    entities = parse_sequence(seq, layout, regions=rules.region_valid.nonzero()[0][:1].tolist() * grounded)
    assert len(entities) <= rules.max_entities
    for previous, entity in zip([None] + entities, entities):
        assert entity.start <= entity.end < rules.n_words
        assert previous is None or entity.start > previous.end
        assert entity.region is None or rules.region_valid[entity.region]


@pytest.mark.parametrize("head", ["flat", "hierarchical"])
@pytest.mark.parametrize("seed", range(5))
def test_decoding_from_random_logits_gives_only_valid_sequences(seed, head):
    layout = Layout(n_types=4, n_words=9, n_regions=3, head=head)
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


def _region_batch():
    tweets, *tables = tiny_dataset()
    model = _model(tweets).eval()  # the hierarchical head, the default
    data = IndexTrainingSet(model, tweets, VisualStore(*tables, top_k=K))
    return model, data.batch(list(range(len(data))))


def test_region_kl_only_for_groundable_entities_a_candidate_covers():
    model, batch = _region_batch()
    with torch.no_grad():
        full = model.loss(batch)
        states = model.encode_batch(batch)
        layout = model.layout(states)
        seqs = [build_target(entities, layout) for entities in batch["entities"]]
        steps = [(b, i) for b, seq in enumerate(seqs) for i in region_steps(seq, layout)]
        targets = [t[1:] for es, ts in zip(batch["entities"], batch["region_targets"])
                   for e, t in zip(es, ts) if e.region is not None]
        # Ann Lee's box is the one a candidate covers (in 6 of the tiny tweets); the other 10 entities are not grounded.
        assert len(steps) == len(targets) == 6 and sum(map(len, batch["entities"])) == 16
        inputs = torch.full((len(seqs), max(map(len, seqs))), EOS)
        for b, seq in enumerate(seqs):
            inputs[b, : len(seq)] = torch.tensor([-1] + seq[:-1])
        regions = model.symbol_logits(states, torch.arange(len(seqs)), inputs).regions
        b, i = map(torch.tensor, zip(*steps))
        kl = grounding_loss(regions[b, i], torch.from_numpy(np.stack(targets)), "kl")
        model.visual_cfg = replace(model.visual_cfg, region_weight=0.0)
        sequence = model.loss(batch)
        model.visual_cfg = replace(model.visual_cfg, region_weight=1.0)
        assert full.item() == pytest.approx(sequence.item() + kl.item(), rel=1e-5) and kl.item() > 0
        # An ungroundable (or uncovered) entity's target never enters the loss.
        changed = dict(batch, region_targets=[[np.full_like(t, 0.5) if e.region is None else t
                                               for e, t in zip(es, ts)]
                                              for es, ts in zip(batch["entities"], batch["region_targets"])])
        assert model.loss(changed).item() == full.item()


def test_pointer_keys_average_inputs_and_encoder_states():
    model, batch = _region_batch()
    with torch.no_grad():
        model.key_mlp[-1].weight.zero_()
        model.key_mlp[-1].bias.zero_()  # MLP(H) = 0: the keys are half the inputs (Eqs. 8 and 11)
        states = model.encode_batch(batch)
        inputs = model.encoder_inputs(batch)
        rows = torch.arange(len(states["words"]))[:, None]
        tokens = batch["input_ids"][rows, batch["word_pos"]]
        norm = model.encoder.get_encoder().layernorm_embedding  # T and V enter as the encoder normalises them
        embedded = model.encoder.get_encoder().embed_tokens(tokens)  # T: the words' BART token embeddings
        assert torch.allclose(states["word_keys"], norm(embedded) / 2, atol=1e-6)
        assert torch.allclose(states["region_keys"], norm(inputs["embeds"][rows, inputs["region_slots"]]) / 2)
        # Eq. 9: a symbol's score is the decoder state times the symbol's own embedding C (decoding from BOS,
        # whose embedding is a row of its own, so scaling a type's row scales exactly its score).
        bos = torch.tensor([[-1]])
        before = model.symbol_logits(states, torch.tensor([3]), bos)
        assert before.symbols.shape[-1] == model.layout(states).size and before.regions.shape[-1] == K
        first_type = model.layout(states).first_type
        model.symbol.weight[first_type] *= 2
        after = model.symbol_logits(states, torch.tensor([3]), bos).symbols
        assert torch.allclose(after[..., first_type], 2 * before.symbols[..., first_type])
        assert torch.equal(after[..., first_type + 1 :], before.symbols[..., first_type + 1 :])


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


def _same(module: torch.nn.Module, other: torch.nn.Module) -> bool:
    theirs = other.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in module.state_dict().items())


@pytest.mark.parametrize("objects", ["linear", "connector"])
def test_index_model_starts_from_a_dlram_checkpoint(tmp_path, monkeypatch, objects):
    tweets, *tables = tiny_dataset()
    store = VisualStore(*tables, top_k=K)
    params = repo_params("train.tiny={hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
                         "intermediate_size: 32}", "train.max_length=32", f"pretrain.objects={objects}",
                         f"pretrain.top_k={K}")
    seed_everything(1)
    pretrained = build_alignment(params, tweets, store)
    pretrained.visual.region_mean.fill_(0.25)  # statistics the fine-tuned model must keep
    pretrained.save(tmp_path / "pretrain")
    model = build_model(CFG, {**GROUP, "init": "pretrain"}, tweets, DIM,
                        checkpoint=read_checkpoint(tmp_path / "pretrain"))
    # T: the pre-trained text encoder and its tokenizer; V and O: its image map and object map.
    assert model.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()
    assert _same(model.text_encoder, pretrained.encoder) and _same(model.visual_projection.image, pretrained.image)
    module = "objects" if objects == "linear" else "connector"
    assert _same(getattr(model.visual_projection, module), getattr(pretrained, module))
    assert model.visual_cfg.aligned == {"text_dim": 16, "objects": objects,
                                        "connector": pretrained.cfg.connector if objects == "connector" else None}
    data = IndexTrainingSet(model, tweets, store)
    model.fit_feature_statistics(data.visuals)
    assert torch.all(model.visual_projection.region_mean == 0.25)
    encoder_group = {id(p) for g in param_groups(model, model.pretrained, 1e-4, 1e-2, 0.0) if g["name"] == "encoder"
                     for p in g["params"]}
    assert all(id(p) in encoder_group for p in model.text_encoder.parameters())
    model.train()
    model.loss(data.batch(list(range(len(data))))).backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0

    model.save(tmp_path / "index")
    assert (tmp_path / "index" / "text_encoder" / "config.json").is_file()
    write_tables(tmp_path, tables)
    monkeypatch.chdir(tmp_path)
    loaded = load(tmp_path / "index")
    assert loaded.model.visual_cfg == model.visual_cfg and _same(loaded.model, model)
    assert loaded.predict(tweets, tables[0]).equals(VisualPredictor(model.eval(), store).predict(tweets))


def test_bad_head_and_init_are_the_params_one_line_errors(tmp_path):
    with pytest.raises(ParamError, match="^train_index: head must be one of"):
        index_config({**GROUP, "head": "tree"}, DIM)
    tweets, *tables = tiny_dataset()
    write_tables(write_splits(tmp_path, {"train": tweets, "dev": tweets}), tables)
    params = repo_params("train.threads=0", "train.max_length=32")
    params["train_index"].update(GROUP, init=str(tmp_path / "nowhere"))
    with pytest.raises(ParamError, match="^train_index.init: .*nowhere/pretrain.json: not a pretrain checkpoint"):
        run_stage(params, tmp_path)


def test_a_pretrained_bart_starts_its_symbols_from_their_names(tmp_path):
    tweets, *_ = tiny_dataset()
    names = ["which", "region", "no", "person", "location"]
    bart, tokenizer = build_bart("tiny", GROUP["tiny"], [w for t in tweets.column("tokens").to_pylist() for w in t]
                                 + names * 2)  # seen twice: whole words in the vocabulary
    bart.save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    model = build_model(CFG, {**GROUP, "model": str(tmp_path / "bart")}, tweets, DIM)  # a local folder: not tiny
    embed = model.encoder.get_encoder().embed_tokens.weight
    vocab = model.tokenizer.get_vocab()
    with torch.no_grad():
        assert torch.allclose(model.symbol.weight[GROUNDABLE], embed[[vocab["which"], vocab["region"]]].mean(0))
        assert torch.allclose(model.symbol.weight[UNGROUNDABLE], embed[[vocab["no"], vocab["region"]]].mean(0))
        loc, per = (model.layout({"words": torch.zeros(1, 1, 1), "regions": torch.zeros(1, 0, 1)}).first_type + i
                    for i in range(2))  # types sorted: LOC, PER
        assert torch.equal(model.symbol.weight[loc], embed[vocab["location"]])
        assert torch.equal(model.symbol.weight[per], embed[vocab["person"]])
    # The tiny BART (random, its own vocabulary) keeps random symbols.
    assert not torch.equal(_model(tweets).symbol.weight[GROUNDABLE], model.symbol.weight[GROUNDABLE])
