"""The VSGN tagger: masks, the text path without an image, gradients, ablations, save / load, the stage."""

import json

import pyarrow as pa
import pytest
import torch

from gmner.models.predictor import TaggerPredictor
from gmner.models.tagger import CRFTagger
from gmner.models.visual_model import VisualPredictor
from gmner.models.visual_store import VisualStore
from gmner.models.vsgn import VSGNConfig, VSGNTagger, load_predictor
from gmner.training.tagger import fit_tagger
from gmner.training.visual import VisualTrainingSet, dev_score
from gmner.training.vsgn import run_stage, vsgn_config

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
GROUP = {"top_k": K, "patches": True, "captions": True, "vsg": True, "fusion": "cir", "graph_top_k": 2,
         "graph_layers": 1, "local_window": 3, "lambda_align": 0.5, "hidden": 8, "heads": 2, "cir_momentum": 0.1}


def _model(tweets: pa.Table, **changes) -> VSGNTagger:
    return seeded_tagger(tweets, VSGNTagger, TRAIN, visual=vsgn_config({**GROUP, **changes}, DIM, PATCH_DIM))


def _store(tables, model: VSGNTagger) -> VisualStore:
    regions, region_features, image_features, captions = tables
    return VisualStore(regions, region_features, image_features, K, model.extras, {"captions": captions})


def _data(**changes):
    tweets, *tables = tiny_vsgn_dataset()
    model = _model(tweets, **changes)
    data = VisualTrainingSet(model, tweets, _store(tables, model))
    model.fit_feature_statistics(data.visuals)
    return model, data


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
    stats = model.patch_path
    assert not torch.equal(stats.patch_mean, torch.zeros(PATCH_DIM)) and (stats.patch_std > 0).all()


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
    model.train()
    batch = data.batch(range(8))
    assert model.visual_states(batch)[1].item() > 0  # the alignment term
    model.loss(batch).backward()
    for name in ("patch_path.text_graph.query.weight", "patch_path.image_graph.key.weight",
                 "patch_path.text_graph.prior", "patch_path.image_graph.layers.0.weight",
                 "patch_path.attention.query.weight", "fusion.weight", "fusion.rho", "caption.weight",
                 "projection.region.weight", "region_score.weight", "gate.weight", "visual_out.weight",
                 "encoder.embeddings.word_embeddings.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("changes", [
    {"vsg": False}, {"fusion": "concat"}, {"fusion": "sum"}, {"captions": False},
    {"patches": False, "vsg": False}, {"local_window": None},
])
def test_each_ablation_builds_and_trains_a_step(changes):
    model, data = _data(**changes)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = data.batch(range(8))
    first = model.loss(batch)
    optimizer.zero_grad()
    first.backward()
    optimizer.step()
    assert torch.isfinite(first) and model.loss(batch).item() != first.item()
    assert ("caption" in dict(model.named_children())) == model.visual_cfg.captions
    assert (model.patch_path is None) == (changes.get("patches") is False)
    if model.patch_path is not None:
        assert hasattr(model.patch_path, "text_graph") == model.visual_cfg.vsg


def test_save_load_round_trip_predicts_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the loaded predictor reads the tables relative to the working directory
    tweets, *tables = tiny_vsgn_dataset()
    write_tables(tmp_path, tables)
    model = _model(tweets)
    data = VisualTrainingSet(model, tweets, _store(tables, model))
    model.fit_feature_statistics(data.visuals)
    model.train()
    model.loss(data.batch(range(8)))  # CIR's running statistics move off their init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoder."):
                p.add_(torch.randn_like(p))
    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["kind"] == "vsgn"
    expected = VisualPredictor(model.eval(), _store(tables, model)).predict(tweets)
    loaded = load_predictor(tmp_path / "model", torch.device("cpu"))
    assert isinstance(loaded.model, VSGNTagger) and loaded.model.visual_cfg == model.visual_cfg
    assert torch.equal(loaded.model.fusion.running_mean, model.fusion.running_mean)
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
