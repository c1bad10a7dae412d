"""The VSGN tagger: CIR's equations on hand-sized inputs, masks, the text path without an image, gradients,
ablations, save / load, the stage."""

import json
import math

import pyarrow as pa
import pytest
import torch

from gmner.models.graphs import (
    ChannelInhibitoryRouting,
    ConcatFusion,
    Gate,
    SqueezeExcitation,
    WeightedSumFusion,
    channel_deviation,
    inhibitory_routing,
)
from gmner.models.predictor import TaggerPredictor
from gmner.models.tagger import CRFTagger
from gmner.models.visual_model import VisualPredictor
from gmner.models.visual_store import VisualStore
from gmner.models.vsgn import VSGNConfig, VSGNTagger, load_predictor
from gmner.training.tagger import fit_tagger
from gmner.training.visual import VisualTrainingSet, dev_score
from gmner.training.vsgn import VSGNTrainingSet, run_stage, vsgn_config

from helpers import (
    DIM,
    PATCH_DIM,
    PATCHES,
    TINY_TRAIN,
    K,
    repo_params,
    seeded_tagger,
    tiny_vsgn_dataset,
    write_splits,
    write_tables,
)

TRAIN = dict(TINY_TRAIN, epochs=1)
GROUP = {"top_k": K, "patches": True, "captions": True, "caption_length": 6, "vsg": True, "fusion": "cir",
         "graph_top_k": 2, "graph_layers": 1, "local_window": 3, "lambda_align": 0.5, "hidden": 8, "heads": 2,
         "reduction": 4, "gamma": 1.0, "beta_start": 0.1, "beta_end": 1.0, "beta_warmup": 2}


def _model(tweets: pa.Table, **changes) -> VSGNTagger:
    return seeded_tagger(tweets, VSGNTagger, TRAIN, visual=vsgn_config({**GROUP, **changes}, DIM, PATCH_DIM))


def _store(tables, model: VSGNTagger) -> VisualStore:
    regions, region_features, image_features, captions = tables
    return VisualStore(regions, region_features, image_features, K, model.extras, {"captions": captions})


def _data(**changes):
    tweets, *tables = tiny_vsgn_dataset()
    model = _model(tweets, **changes)
    data = VSGNTrainingSet(model, tweets, _store(tables, model))
    model.fit_feature_statistics(data.visuals)
    return model, data


# --- CIR's equations (section 3.4), on hand-sized inputs ------------------------------------------------------


def test_uniform_relevance_and_zero_deviation_route_uniformly():
    p = torch.full((2, 4), 0.3)
    z = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    deviation = channel_deviation(z, canonical=z.clone(), weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert torch.equal(deviation, torch.zeros(2, 4))
    # B(c) = d * softmax: exactly 1 in every channel, whatever beta and gamma.
    torch.testing.assert_close(inhibitory_routing(p, deviation, beta=5.0, gamma=0.1), torch.ones(2, 4))


def test_the_deviation_is_each_channels_share_of_the_weighted_squared_deviation():
    z, v, w = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 5.0, 2.0])
    # (w |z - v|)^2 = (4, 0, 4); their sum 8
    torch.testing.assert_close(channel_deviation(z, v, w), torch.tensor([0.5, 0.0, 0.5]))


def test_beta_zero_removes_the_deviation_term_and_beta_inhibits_deviant_channels():
    p = torch.tensor([[0.2, 0.9, 0.5]])
    deviation = torch.tensor([[0.0, 1.0, 0.0]])
    expected = 3 * torch.softmax(p / 0.5, -1)
    torch.testing.assert_close(inhibitory_routing(p, deviation, beta=0.0, gamma=0.5), expected)
    routed = inhibitory_routing(p, deviation, beta=2.0, gamma=0.5)
    # Logits (0.4, 1.8 - 4, 1.0): the deviant channel 1 falls from the largest weight to the smallest.
    torch.testing.assert_close(routed, 3 * torch.softmax(torch.tensor([[0.4, -2.2, 1.0]]), -1))
    assert routed.argmin().item() == 1 and expected.argmax().item() == 1


def test_squeeze_excitation_gives_one_relevance_in_0_1_per_channel():
    torch.manual_seed(0)
    se = SqueezeExcitation(8, reduction=4)
    assert se.net[0].out_features == 2 and se.net[2].out_features == 8
    p = se(torch.randn(3, 8) * 10)
    assert p.shape == (3, 8) and (p > 0).all() and (p < 1).all()
    with torch.no_grad():  # sigmoid(W2 relu(W1 z + b1) + b2) with W2 = 0: sigmoid(b2)
        se.net[2].weight.zero_()
        se.net[2].bias.fill_(math.log(3.0))
    torch.testing.assert_close(se(torch.randn(3, 8)), torch.full((3, 8), 0.75))


@pytest.mark.parametrize("per_channel", [True, False])
def test_a_gate_at_0_or_1_selects_one_stream(per_channel):
    gate = Gate(4, per_channel=per_channel)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert gate.linear.out_features == (4 if per_channel else 1)
    with torch.no_grad():
        gate.linear.weight.zero_()
        gate.linear.bias.fill_(100.0)  # g = 1: a
    torch.testing.assert_close(gate(a, b), a)
    with torch.no_grad():
        gate.linear.bias.fill_(-100.0)  # g = 0: b
    torch.testing.assert_close(gate(a, b), b)
    with torch.no_grad():
        gate.linear.bias.fill_(0.0)  # g = 1/2: the mean
    torch.testing.assert_close(gate(a, b), (a + b) / 2)
    torch.testing.assert_close(Gate(4, per_channel, start=0.8)(a, b), 0.8 * a + 0.2 * b)  # g starts at 0.8


def _branches():
    torch.manual_seed(0)
    h_t, h_it, h_ic = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 2, 8)
    text_mask = torch.tensor([[True, True, True], [True, True, False]])
    ic_mask = torch.tensor([[True, True], [False, False]])  # tweet 1 has no description
    return h_t, text_mask, h_it, h_ic, ic_mask


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with noise added to every weight (outside a model's encoder): far from its initialisation."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("encoder."):
                p.add_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("fusion", [ChannelInhibitoryRouting, ConcatFusion])
def test_h_out_starts_as_the_normalised_text_states(fusion):
    h_t, text_mask, h_it, h_ic, ic_mask = _branches()
    fuse = (fusion(8, heads=2, reduction=4, gamma=1.0, beta=0.5) if fusion is ChannelInhibitoryRouting
            else fusion(8)).eval()
    torch.testing.assert_close(fuse(h_t, text_mask, h_it, h_ic, ic_mask), fuse.norm(h_t))


def test_cir_routes_on_the_pooled_branches_and_normalises_the_residual():
    h_t, text_mask, h_it, h_ic, ic_mask = _branches()
    cir = _randomised(ChannelInhibitoryRouting(8, heads=2, reduction=4, gamma=1.0, beta=0.5)).eval()
    with torch.no_grad():  # uniform relevance (p = 1/2): the routing is the deviation's alone
        cir.relevance.net[2].weight.zero_()
        cir.relevance.net[2].bias.zero_()
    z = torch.cat([h_it[0], h_ic[0]]).mean(0)  # GAP over every valid row of both branches
    expected = 8 * torch.softmax(-0.5 * channel_deviation(z, cir.canonical, cir.weight), -1)
    torch.testing.assert_close(cir.routing(h_it, text_mask, h_ic, ic_mask)[0], expected)
    out = cir(h_t, text_mask, h_it, h_ic, ic_mask)
    unit = (out - cir.norm.bias) / cir.norm.weight  # LayerNorm(H_t + ...) before its affine map
    torch.testing.assert_close(unit.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    # Tweet 0's keys are its description rows: its H_IT rows do not change its output beyond the query.
    changed = h_ic.clone()
    changed[1] = 1e3  # tweet 1 has no description: its H_IC rows are never read
    torch.testing.assert_close(cir(h_t, text_mask, h_it, changed, ic_mask)[1], out[1])
    assert not torch.allclose(cir(h_t, text_mask, h_it, h_ic * 2, ic_mask)[0], out[0])


@pytest.mark.parametrize("fusion", [ConcatFusion, WeightedSumFusion])
def test_fusion_ablations_read_both_branches_and_no_absent_description(fusion):
    h_t, text_mask, h_it, h_ic, ic_mask = _branches()
    fuse = _randomised(fusion(8))
    out = fuse(h_t, text_mask, h_it, h_ic, ic_mask)
    changed = h_ic.clone()
    changed[1] = 1e3
    torch.testing.assert_close(fuse(h_t, text_mask, h_it, changed, ic_mask)[1], out[1])
    assert not torch.allclose(fuse(h_t, text_mask, h_it, h_ic * 2, ic_mask)[0], out[0])
    if fusion is WeightedSumFusion:  # weights softmax(logits); tweet 1 (no description): all on H_IT
        a = torch.softmax(fuse.logits, 0)
        mixed = torch.stack([a[0] * h_it[0] + a[1] * h_ic[0].mean(0), h_it[1]])
        torch.testing.assert_close(out, fuse.norm(h_t + mixed))


def test_beta_warms_up_by_epoch_and_is_saved_with_the_model():
    cfg = vsgn_config(GROUP, DIM, PATCH_DIM)
    assert [cfg.beta(e) for e in (1, 2, 3, 9)] == [0.1, 0.55, 1.0, 1.0]
    assert vsgn_config({**GROUP, "beta_warmup": 0}, DIM, PATCH_DIM).beta(1) == 1.0
    model, data = _data()
    assert model.fusion.combine.beta.item() == pytest.approx(0.1)
    data.start_epoch(2)
    assert model.fusion.combine.beta.item() == pytest.approx(0.55)
    assert "fusion.combine.beta" in model.state_dict()


def test_config_checks_and_extras():
    assert VSGNConfig(visual_dim=4, patch_dim=6).extras == ("captions", "patches")
    assert VSGNConfig(visual_dim=4, vsg=False, captions=False).extras == ()
    with pytest.raises(ValueError, match="needs patches"):
        VSGNConfig(visual_dim=4)
    with pytest.raises(ValueError, match="fusion must be one of"):
        VSGNConfig(visual_dim=4, patch_dim=6, fusion="max")
    with pytest.raises(ValueError, match="unknown param"):
        vsgn_config({**GROUP, "graph_topk": 5}, DIM, PATCH_DIM)
    assert vsgn_config({**GROUP, "patches": False, "vsg": False}, DIM, PATCH_DIM).patch_dim is None


def test_inputs_and_masks_of_a_batch():
    model, data = _data()
    assert (data.coverage["no_image"], data.coverage["patches_missing"], data.coverage["caption_missing"]) == (1, 2, 1)
    batch = data.batch(range(4))
    assert batch["patch_mask"].tolist() == [[False] * PATCHES] * 3 + [[True] * PATCHES]
    assert batch["image_mask"].tolist() == [False, False, True, True]
    assert batch["context_mask"].any(1).tolist() == [False, False, True, True]  # captions of images 2 and 3
    # The caption again, as its own sequence C: [CLS] a man in the city [SEP], cut at caption_length = 6.
    assert batch["caption_mask"].sum(1).tolist() == [0, 0, 6, 6]
    ids = batch["caption_ids"][2].tolist()
    assert ids[0] == model.tokenizer.cls_token_id and ids[-1] == model.tokenizer.sep_token_id
    assert not torch.equal(model.patch_mean, torch.zeros(PATCH_DIM)) and (model.patch_std > 0).all()
    assert "caption_ids" not in _data(captions=False)[1].batch(range(4))


def test_masked_slots_and_batch_companions_do_not_change_a_tweets_output():
    model, data = _data()
    model.eval()
    batch = data.batch(range(8))
    states, _ = model.visual_states(batch)
    noisy = {key: value.clone() for key, value in batch.items()}
    noisy["patch_tokens"][~batch["patch_mask"]] = 1e3  # missing and padded patches
    noisy["region_features"][~batch["region_mask"]] = -1e3
    noisy["image_features"][~batch["image_mask"]] = 1e3
    assert torch.equal(model.visual_states(noisy)[0], states)
    for i in (0, 2, 3, 5):  # alone, each tweet gets the outputs it got beside the others
        alone, _ = model.visual_states(data.batch([i]))
        n = int(batch["word_mask"][i].sum())
        torch.testing.assert_close(alone[0, :n], states[i, :n], atol=1e-5, rtol=1e-5)
    assert model.decode(data.batch([3])) == [model.decode(batch)[3]]


def test_a_tweet_without_image_takes_exactly_the_text_taggers_path():
    """Guaranteed: with no image (so no caption, patches or features) the emissions equal, bit for bit,
    those of a CRFTagger with the same encoder, classifier and CRF on the same batch; so do the tags."""
    model, data = _data()
    with torch.no_grad():  # a visual side far from its init, so any leak would show
        for name, p in model.named_parameters():
            if not name.startswith(("encoder.", "classifier.", "crf.")):
                p.add_(torch.randn_like(p))
    model.eval()
    text = CRFTagger(model.encoder, model.tokenizer, model.labels, model.max_length, model.dropout_p).eval()
    text.classifier.load_state_dict(model.classifier.state_dict())
    text.crf.load_state_dict(model.crf.state_dict())
    batch = data.batch([0])
    assert not batch["image_mask"].any() and not batch["context_mask"].any()
    states, align = model.visual_states(batch)
    assert align.item() == 0
    assert torch.equal(model.emissions(batch, states), text.emissions(text.collate([data.encoded[0]])))
    tweets = tiny_vsgn_dataset()[0].slice(0, 1)
    store = _store(tiny_vsgn_dataset()[1:], model)
    assert VisualPredictor(model, store).predict(tweets).equals(TaggerPredictor(text).predict(tweets))
    # With an image the visual side does change the emissions.
    with_image = data.batch([3])
    assert not torch.equal(model.emissions(with_image, model.visual_states(with_image)[0]),
                           text.emissions(text.collate([data.encoded[3]])))


@pytest.mark.slow
def test_on_data_without_images_training_is_the_text_taggers():
    """Same seed and dropout: the VSGN trains like CRFTagger (same random draws), up to float rounding."""
    tweets, *tables = tiny_vsgn_dataset()
    tweets = tweets.set_column(tweets.schema.get_field_index("image_sha256"), "image_sha256",
                               pa.nulls(tweets.num_rows, pa.string()))
    cfg = {**TRAIN, "dropout": 0.3, "epochs": 2}
    text = seeded_tagger(tweets, CRFTagger, cfg)
    fit_tagger(text, tweets, tweets, cfg, seed=0)
    model = seeded_tagger(tweets, VSGNTagger, cfg, visual=vsgn_config(GROUP, DIM, PATCH_DIM))
    store = _store(tables, model)
    data = VisualTrainingSet(model, tweets, store)
    model.fit_feature_statistics(data.visuals)
    fit_tagger(model, data, tweets, cfg, seed=0, dev_eval=dev_score(VisualPredictor(model, store), tweets, "mner"))
    model.eval(), text.eval()
    batch = data.batch(range(8))
    torch.testing.assert_close(model.emissions(batch, model.visual_states(batch)[0]),
                               text.emissions(text.collate(data.encoded)), atol=1e-5, rtol=1e-4)
    assert VisualPredictor(model, store).predict(tweets).equals(TaggerPredictor(text).predict(tweets))


def test_loss_backward_reaches_graphs_fusion_and_gate():
    model, data = _data()
    _randomised(model).train()  # at its initialisation H_out's residual branch is zero: no gradient behind it
    batch = data.batch(range(8))
    assert model.visual_states(batch)[1].item() > 0  # the alignment term
    model.loss(batch).backward()
    for name in ("patch_path.text_graph.query.weight", "patch_path.image_graph.key.weight",
                 "patch_path.text_graph.prior", "patch_path.image_graph.layers.0.weight",
                 "patch_path.attention.query.weight", "fusion.image.0.weight", "fusion.patch.0.weight",
                 "fusion.region.0.weight", "fusion.region_score.weight", "fusion.region_gate.linear.weight",
                 "fusion.text_image.query.weight", "fusion.caption_image.value.weight",
                 "fusion.combine.relevance.net.0.weight", "fusion.combine.canonical", "fusion.combine.weight",
                 "fusion.combine.attention.key.weight", "stream_gate.linear.weight",
                 "encoder.embeddings.word_embeddings.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


ABLATIONS = {  # the paper's rows (and two of this implementation's switches)
    "w/o VSG": {"vsg": False},
    "CIR -> concat": {"fusion": "concat"},
    "CIR -> weighted sum": {"fusion": "sum"},
    "w/o description": {"captions": False},
    "w/o VSG & CIR": {"vsg": False, "fusion": "concat"},
    "no patches": {"patches": False, "vsg": False},
    "no local window": {"local_window": None},
}


@pytest.mark.parametrize("changes", ABLATIONS.values(), ids=ABLATIONS)
def test_each_ablation_builds_its_own_model_and_trains_a_step(changes):
    full, data_full = _data()
    model, data = _data(**changes)
    names, full_names = dict(model.named_parameters()), dict(full.named_parameters())
    assert names.keys() != full_names.keys() or changes == {"local_window": None}
    assert isinstance(model.fusion.combine, {"cir": ChannelInhibitoryRouting, "concat": ConcatFusion,
                                             "sum": WeightedSumFusion}[model.visual_cfg.fusion])
    assert (model.fusion.caption_image is None) == (not model.visual_cfg.captions)
    assert (model.patch_path is None) == (changes.get("patches") is False)
    if model.patch_path is not None:
        assert hasattr(model.patch_path, "text_graph") == model.visual_cfg.vsg
    _randomised(model).eval(), _randomised(full).eval()
    with torch.no_grad():
        batch = data.batch(range(8))
        assert not torch.allclose(model.visual_states(batch)[0], full.visual_states(data_full.batch(range(8)))[0])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(batch)
    optimizer.zero_grad()
    first.backward()
    optimizer.step()
    assert torch.isfinite(first) and model.loss(batch).item() != first.item()


def test_the_fusion_values_give_different_outputs_from_the_same_branches():
    outputs = {}
    for fusion in ("cir", "concat", "sum"):
        model, data = _data(fusion=fusion)
        _randomised(model).eval()
        with torch.no_grad():
            outputs[fusion] = model.visual_states(data.batch(range(8)))[0]
    # Tweet 0 has no image: the encoder's states, the same in all three.
    assert torch.equal(outputs["cir"][0], outputs["concat"][0]) and torch.equal(outputs["cir"][0], outputs["sum"][0])
    for a, b in (("cir", "concat"), ("cir", "sum"), ("concat", "sum")):
        assert (outputs[a][3] - outputs[b][3]).abs().max().item() > 1e-3, (a, b)


def test_save_load_round_trip_predicts_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the loaded predictor reads the tables relative to the working directory
    tweets, *tables = tiny_vsgn_dataset()
    write_tables(tmp_path, tables)
    model = _model(tweets)
    data = VisualTrainingSet(model, tweets, _store(tables, model))
    model.fit_feature_statistics(data.visuals)
    model.train()
    model.start_epoch(3)  # CIR's beta moves off its start: saved with the model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoder."):
                p.add_(torch.randn_like(p))
    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["kind"] == "vsgn"
    expected = VisualPredictor(model.eval(), _store(tables, model)).predict(tweets)
    loaded = load_predictor(tmp_path / "model", torch.device("cpu"))
    assert isinstance(loaded.model, VSGNTagger) and loaded.model.visual_cfg == model.visual_cfg
    assert loaded.model.fusion.combine.beta.item() == pytest.approx(1.0)
    assert loaded.predict(tweets, tables[0]).equals(expected)
    assert loaded.counts["no_image"] == 1 and loaded.counts["patches_missing"] == 2


@pytest.mark.slow
def test_stage_writes_the_model_and_the_live_log(tmp_path):
    splits = {split: tiny_vsgn_dataset(split=split) for split in ("train", "dev")}
    write_splits(tmp_path, {split: tweets for split, (tweets, *_) in splits.items()})
    write_tables(tmp_path, splits["dev"][1:])
    params = repo_params("base.seed=0")
    params["train"] = {**params["train"], **TRAIN, "threads": 0}
    params["train_vsgn"] = {**GROUP, "fit": {"epochs": 2}}
    run_stage(params, tmp_path)
    model_dir = tmp_path / "models" / "vsgn"
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and "best_dev_mner_f1" in summary
    assert summary["train_visual"]["no_image"] == 1 and summary["train_visual"]["patches_missing"] == 2
    assert json.loads((model_dir / "model.json").read_text())["visual"]["patch_dim"] == PATCH_DIM
    assert (tmp_path / "dvclive" / "vsgn" / "metrics.json").is_file()
