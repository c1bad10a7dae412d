"""The VSGN tagger: masks, the text path without an image, gradients, ablations, save / load, the stage."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gmner import schema
from gmner.grounding import DEFAULT_PATHS, VisualStore
from gmner.params import load_params, seed_everything
from gmner.predictor import TaggerPredictor
from gmner.tagger import CRFTagger
from gmner.train_tagger import build_crf_tagger, fit
from gmner.train_visual import VisualTrainingSet, dev_score
from gmner.train_vsgn import run_stage, vsgn_config
from gmner.visual_tagger import VisualPredictor
from gmner.vsgn import VSGNConfig, VSGNTagger, load_predictor

ROOT = Path(__file__).resolve().parents[1]
DIM, PATCH_DIM, PATCHES, K = 4, 6, 5, 3
CFG = {
    "encoder": "tiny",
    "tiny": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "max_length": 32, "dropout": 0.0, "epochs": 1, "batch_size": 4, "lr": 1e-3, "head_lr": 1e-2,
    "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0,
}
GROUP = {"top_k": K, "patches": True, "captions": True, "vsg": True, "fusion": "cir", "graph_top_k": 2,
         "graph_layers": 1, "local_window": 3, "lambda_align": 0.5, "hidden": 8, "heads": 2, "cir_momentum": 0.1}
TABLES = ("regions", "region_features", "image_features", "captions")


def _tiny_dataset(n: int = 8, split: str = "train"):
    """Tweets naming a PER and a LOC; tweet 0 has no image, the image of tweet 1 has null features (and no
    caption), tweet 2's image no patch tokens. Returns (tweets, regions, region / image features, captions)."""
    rng = np.random.default_rng(0)
    tweets, regions, region_features, image_features, captions = [], [], [], [], []
    for i in range(n):
        sha = None if i == 0 else f"sha{i}"
        tweets.append({
            "tweet_id": str(i), "split": split, "source": "t", "image_id": str(i), "image_path": f"{i}.jpg",
            "image_sha256": sha, "width": 40 if sha else None, "height": 40 if sha else None,
            "tokens": ["RT", "Ann", "Lee", "visits", "Oslo"][: 5 - i % 2],
            "tags": ["O", "B-PER", "I-PER", "O", "B-LOC"][: 5 - i % 2],
            "entities": [{"start": 1, "end": 3, "type": "PER", "text": "Ann Lee", "boxes": []}]
            + ([{"start": 4, "end": 5, "type": "LOC", "text": "Oslo", "boxes": []}] if i % 2 == 0 else []),
        })
        if sha is None:
            continue
        null = i == 1
        regions.append({"image_sha256": sha, "boxes": [[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]],
                        "scores": [0.9, 0.5, 0.1], "labels": ["o"] * K})
        region_features.append({"image_sha256": sha, "skip_reason": "corrupt_image" if null else None,
                                "embeddings": None if null else rng.normal(size=(K, DIM)).tolist()})
        image_features.append({
            "image_sha256": sha, "skip_reason": "corrupt_image" if null else None,
            "embedding": None if null else rng.normal(size=DIM).tolist(),
            "patch_tokens": None if null or i == 2 else rng.normal(size=(PATCHES, PATCH_DIM)).tolist(),
        })
        captions.append({"image_sha256": sha, "caption": None if null else f"a man in {'red' if i % 2 else 'the'} city",
                         "skip_reason": "corrupt_image" if null else None})
    vec = pa.list_(pa.float32(), DIM)
    return (
        pa.Table.from_pylist(tweets, schema=schema.TWEETS),
        pa.Table.from_pylist(regions, schema=schema.REGIONS),
        pa.Table.from_pylist(region_features, schema=pa.schema(
            [("image_sha256", pa.string()), ("embeddings", pa.list_(vec)), ("skip_reason", pa.string())])),
        pa.Table.from_pylist(image_features, schema=pa.schema([
            ("image_sha256", pa.string()), ("embedding", vec),
            ("patch_tokens", pa.list_(pa.list_(pa.float32(), PATCH_DIM), PATCHES)), ("skip_reason", pa.string())])),
        pa.Table.from_pylist(captions, schema=pa.schema(
            [("image_sha256", pa.string()), ("caption", pa.string()), ("skip_reason", pa.string())])),
    )


def _model(tweets: pa.Table, **changes) -> VSGNTagger:
    seed_everything(0)
    cfg = vsgn_config({**GROUP, **changes}, DIM, PATCH_DIM)
    return build_crf_tagger(CFG, tweets, VSGNTagger, visual=cfg)


def _store(tables, model: VSGNTagger) -> VisualStore:
    regions, region_features, image_features, captions = tables
    return VisualStore(regions, region_features, image_features, K, model.extras, {"captions": captions})


def _data(**changes):
    tweets, *tables = _tiny_dataset()
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
    with pytest.raises(ValueError, match="unknown params"):
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
    tweets = _tiny_dataset()[0].slice(0, 1)
    store = _store(_tiny_dataset()[1:], model)
    assert VisualPredictor(model, store).predict(tweets).equals(TaggerPredictor(text).predict(tweets))
    # With an image the visual side does change the emissions.
    with_image = data.batch([3])
    assert not torch.equal(model.emissions(with_image, model.visual_states(with_image)[0]),
                           text.emissions(text.collate([data.encoded[3]])))


def test_on_data_without_images_training_is_the_text_taggers():
    """Same seed and dropout: the VSGN trains like CRFTagger (same random draws), up to float rounding."""
    tweets, *tables = _tiny_dataset()
    tweets = tweets.set_column(tweets.schema.get_field_index("image_sha256"), "image_sha256",
                               pa.nulls(tweets.num_rows, pa.string()))
    cfg = {**CFG, "dropout": 0.3, "epochs": 2}
    seed_everything(0)
    text = build_crf_tagger(cfg, tweets, CRFTagger)
    fit(text, tweets, tweets, cfg, seed=0)
    seed_everything(0)
    model = build_crf_tagger(cfg, tweets, VSGNTagger, visual=vsgn_config(GROUP, DIM, PATCH_DIM))
    store = _store(tables, model)
    data = VisualTrainingSet(model, tweets, store)
    model.fit_feature_statistics(data.visuals)
    fit(model, data, tweets, cfg, seed=0, dev_score=dev_score(VisualPredictor(model, store), tweets, "mner"))
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
    tweets, *tables = _tiny_dataset()
    _write_tables(tables, tmp_path)
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


def _write_tables(tables, root: Path) -> None:
    for key, table in zip(TABLES, tables):
        path = root / DEFAULT_PATHS[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)


def test_stage_writes_the_model_and_the_live_log(tmp_path):
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    for split in ("train", "dev"):
        tweets, *tables = _tiny_dataset(split=split)
        pq.write_table(tweets, tmp_path / "data" / "prepared" / f"{split}.parquet")
    _write_tables(tables, tmp_path)
    params = load_params(ROOT / "params.yaml", ["base.seed=0"])
    params["train"] = {**params["train"], **CFG, "threads": 0}
    params["train_vsgn"] = {**GROUP, "fit": {"epochs": 2}}
    run_stage(params, tmp_path)
    model_dir = tmp_path / "models" / "vsgn"
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and "best_dev_mner_f1" in summary
    assert summary["train_visual"]["no_image"] == 1 and summary["train_visual"]["patches_missing"] == 2
    assert json.loads((model_dir / "model.json").read_text())["visual"]["patch_dim"] == PATCH_DIM
    assert (tmp_path / "dvclive" / "vsgn" / "metrics.json").is_file()
