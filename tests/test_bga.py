"""BGA-MNER: inference from generated features (never an image) with predicted-span salience, the text-only
ablation, the generation and cycle losses and their masks, the stage-refined context sampler, the
shuffled-image control, save / load without visual tables, and the train_bga stage end to end."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gmner.core import schema
from gmner.models import predictor, visual_model
from gmner.models.bga import TERMS, BGAConfig, BGATagger, ContextSampler, GenerationHeads, load_predictor, matched
from gmner.models.tagger import CRFTagger
from gmner.models.visual_model import VisualPredictor
from gmner.models.visual_store import NO_IMAGE, ImageVisual, VisualStore
from gmner.training.bga import BGATrainingSet, bga_config, run_stage, shuffled_images
from gmner.training.tagger import fit_tagger

from helpers import (
    DIM,
    TINY_TRAIN,
    K,
    Killed,
    gmner_predict,
    kill_after_checkpoint,
    same_run,
    seeded_tagger,
    tiny_bga_dataset,
    write_splits,
    write_tables,
)


def _store(tables: dict[str, pa.Table]) -> VisualStore:
    return VisualStore(tables["regions"], tables["region_features"], tables["image_features"], top_k=K,
                       extras=("text",), extra_tables={"text_features": tables["text_features"]})


def _model(tweets: pa.Table, **cfg) -> BGATagger:
    return seeded_tagger(tweets, BGATagger, visual=BGAConfig(visual_dim=DIM, top_k=K, hidden=8, **cfg))


def _data(model: BGATagger, tweets: pa.Table, tables: dict) -> BGATrainingSet:
    data = BGATrainingSet(model, tweets, _store(tables))
    model.fit_feature_statistics(data.visuals)
    return data


def test_config_checks_loss_and_schedule():
    assert BGAConfig(visual_dim=DIM, stage_epochs=[1, 3], thresholds=[-1, 0.5]).thresholds == (-1.0, 0.5)
    assert BGAConfig(visual_dim=DIM).extras == ("text",) and BGAConfig(DIM, text_target=False).extras == ()
    with pytest.raises(ValueError, match="loss"):
        BGAConfig(visual_dim=DIM, loss="mse")
    with pytest.raises(ValueError, match="start at 1"):
        BGAConfig(visual_dim=DIM, stage_epochs=[2, 4], thresholds=[-1, 0])
    with pytest.raises(ValueError, match="2 start epochs for 3 thresholds"):
        BGAConfig(visual_dim=DIM, stage_epochs=[1, 4], thresholds=[-1, 0, 1])
    with pytest.raises(ValueError, match="train_bga.weight: unknown param"):
        bga_config({"top_k": K, "weight": 1.0}, DIM)
    with pytest.raises(ValueError, match="inference must be one of"):
        BGAConfig(visual_dim=DIM, inference="image")
    with pytest.raises(ValueError, match="generated_share"):
        BGAConfig(visual_dim=DIM, generated_share=1.5)
    assert bga_config({"top_k": K, "shuffle_images": True, "fit": {}}, DIM) == BGAConfig(visual_dim=DIM, top_k=K)


def test_sampler_keeps_everything_in_stage_1_and_less_later():
    # Pair 0: 3 words (the last is padding) x 3 regions (the last is padding); pair 1 has no regions.
    similarity = torch.tensor([
        [[0.9, 0.1, 5.0], [0.2, 0.3, 5.0], [5.0, 5.0, 5.0]],
        [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]],
    ])
    word_mask = torch.tensor([[True, True, False], [True, True, True]])
    region_mask = torch.tensor([[True, True, False], [False, False, False]])
    sampler = ContextSampler(stage_epochs=[1, 2, 3], thresholds=[-1.0, 0.5, 0.95])

    words, regions = sampler(similarity, word_mask, region_mask)
    assert torch.equal(words, word_mask) and torch.equal(regions, region_mask)
    sampler.epoch = 2  # word 1 (best 0.3) and region 1 (best 0.3) fall below 0.5; padding is never kept
    words, regions = sampler(similarity, word_mask, region_mask)
    assert words.tolist() == [[True, False, False], [True, True, True]]
    assert regions.tolist() == [[True, False, False], [False, False, False]]
    sampler.epoch = 3  # nothing passes 0.95: the best word and region of the pair stay
    assert [m.tolist() for m in sampler(similarity, word_mask, region_mask)] == [
        [[True, False, False], [True, True, True]], [[True, False, False], [False] * 3]]

    # Counts cover the pair with regions only; kept and dropped add up to what was seen.
    assert [sampler.counts[f"stage_{s}"]["threshold"] for s in (1, 2, 3)] == [-1.0, 0.5, 0.95]
    for stage, kept in (("stage_1", 2), ("stage_2", 1), ("stage_3", 1)):
        counts = sampler.counts[stage]
        assert (counts["pairs"], counts["words"], counts["regions"]) == (1, 2, 2)
        assert counts["words_kept"] == counts["regions_kept"] == kept
    assert matched(similarity, word_mask, region_mask, 0.2)[0].tolist() == [[True, True, False], [True] * 3]


def test_inference_reads_no_image():
    tweets, tables = tiny_bga_dataset()
    model = _model(tweets)
    with torch.no_grad():  # a head and CRF far from their init, so the tags are not all "O"
        for p in [*model.classifier.parameters(), *model.generation.parameters()]:
            p.add_(torch.randn_like(p))
    tokens = tweets.column("tokens").to_pylist()
    store = _store(tables)
    visuals, _ = store.lookup_table(tweets)
    expected = model.predict_entities(tokens, visuals)
    assert any(expected)
    noise = [ImageVisual(v.boxes, None if v.embeddings is None else 1e3 * np.random.randn(*v.embeddings.shape),
                         np.random.randn(DIM) * 1e3, 40, 40, text=np.random.randn(DIM)) for v in visuals]
    assert model.predict_entities(tokens, [NO_IMAGE] * len(tokens)) == expected
    assert model.predict_entities(tokens, noise) == expected
    assert model.predict_entities(tokens) == expected

    # Through the store too: real, garbage, and no features give the same predictions.
    images = tables["image_features"]
    noise_column = pa.array((np.random.randn(images.num_rows, DIM) * 1e3).tolist(), schema.vector(DIM))
    garbage = dict(tables, image_features=images.set_column(1, "embedding", noise_column))
    empty = {key: table.slice(0, 0) for key, table in tables.items()}
    predictions = [VisualPredictor(model, _store(t)).predict(tweets) for t in (tables, garbage, empty)]
    assert predictions[0].column("entities").to_pylist() == expected
    assert predictions[1].equals(predictions[0]) and predictions[2].equals(predictions[0])


def _far_from_init(model: BGATagger) -> BGATagger:
    """Classifier, CRF, generators and interaction far from their init, so that tags and effects are not tiny."""
    with torch.no_grad():
        for p in [*model.classifier.parameters(), *model.crf.parameters(), *model.generation.parameters(),
                  *model.interaction.parameters()]:
            p.add_(torch.randn_like(p))
    return model.eval()


def test_inference_uses_the_generated_features_and_never_an_image(tmp_path, monkeypatch):
    tweets, tables = tiny_bga_dataset()
    model = _far_from_init(_model(tweets))
    _data(model, tweets, tables)
    tokens = tweets.column("tokens").to_pylist()
    expected = model.predict_entities(tokens)
    model.save(tmp_path / "model")

    def refuse(*args, **kwargs):
        raise AssertionError("an image input was read at inference")

    with monkeypatch.context() as patch:  # no table lookup, no visual batch, no real slot
        patch.setattr(VisualStore, "lookup_table", refuse)
        patch.setattr(VisualStore, "read", refuse)
        patch.setattr(visual_model, "collate_visual", refuse)
        patch.setattr(GenerationHeads, "real_slots", refuse)
        loaded = load_predictor(tmp_path / "model", torch.device("cpu"))
        assert loaded.predict(tweets).column("entities").to_pylist() == expected
        assert any(expected)

        # The emissions are the fused states': other generated features, other emissions and tags.
        batch = model.collate(model.encode(tokens)[0])  # text only: no label, no visual input
        emissions = model.emissions(batch)
        assert (emissions - CRFTagger.emissions(model, batch)).abs().max() > 0.1
        with torch.no_grad():
            model.generation.text_to_object[2].bias.add_(10.0)
            moved = model.emissions(batch)
        assert (moved - emissions).abs().amax(dim=(1, 2)).min() > 1e-2
        assert model.predict_entities(tokens) != expected

    # The ablation decodes the text tagger's emissions: the generators change nothing.
    text_only = _model(tweets, inference="text_only").eval()
    before = text_only.emissions(batch)
    with torch.no_grad():
        text_only.generation.text_to_object[2].bias.add_(10.0)
    assert torch.equal(text_only.emissions(batch), before)
    torch.testing.assert_close(before, CRFTagger.emissions(text_only, batch))


def test_salience_at_inference_comes_from_the_predicted_spans():
    tweets, tables = tiny_bga_dataset()
    model = _far_from_init(_model(tweets))
    model.generation.cfg = BGAConfig(visual_dim=DIM, top_k=K, hidden=8, salience=50.0)  # salience decisive
    batch = model.collate(model.encode(tweets.column("tokens").to_pylist())[0])
    with torch.no_grad():
        states = model.word_states(batch)
        # No transition scores, and "O" as likely as the best other label for the median word: the first pass
        # tags some words as entities, not all.
        for p in model.crf.parameters():
            p.zero_()
        text = CRFTagger.emissions(model, batch, states)
        model.classifier.bias[0] += (text[..., 1:].amax(dim=-1) - text[..., 0]).median()
        text = CRFTagger.emissions(model, batch, states)
        entity = model.predicted_entities(text, batch["word_mask"])
        decoded = model.crf.decode(text, mask=batch["word_mask"])
        assert entity.tolist() == [[label > 0 for label in ids] for ids in decoded]  # every word is encoded
        assert 0 < int(entity.sum()) < int(batch["word_mask"].sum())

        def emissions_with(salient: torch.Tensor) -> torch.Tensor:
            slots = model.generation.generated_slots(states, batch["word_mask"], salient)
            return model.classifier(model.interaction(states, *slots))

        torch.testing.assert_close(model.emissions(batch), emissions_with(entity))
        assert (emissions_with(~entity & batch["word_mask"]) - emissions_with(entity)).abs().max() > 1e-2


def test_training_reads_the_real_features_or_a_share_of_generated_ones():
    tweets, tables = tiny_bga_dataset()
    for share, reads_image in ((0.0, True), (1.0, False)):
        model = _far_from_init(_model(tweets, generated_share=share))
        data = _data(model, tweets, tables)
        batch = data.batch([0, 2, 4, 5])  # no image; three with one
        noisy = dict(batch, image_features=batch["image_features"] + 5, region_features=-batch["region_features"])
        model.train()

        def emissions(inputs: dict) -> torch.Tensor:
            torch.manual_seed(0)  # the same encoder dropout masks each time: only the slots differ
            with torch.no_grad():
                return model.emissions(inputs)

        change = (emissions(noisy) - emissions(batch)).abs().amax(dim=(1, 2))
        assert change[0].item() == 0  # the tweet without image reads generated slots either way
        assert bool((change[1:] > 1e-3).all()) == reads_image, (share, change)


def test_cycle_term_is_finite_and_falls():
    tweets, tables = tiny_bga_dataset()
    model = _model(tweets)
    batch = _data(model, tweets, tables).batch(range(2, 8))
    optimizer = torch.optim.Adam(model.generation.parameters(), lr=1e-2)
    values = []
    for _ in range(8):
        optimizer.zero_grad()
        cycle = model.generation_losses(batch)["cycle"]
        values.append(cycle.item())
        cycle.backward()
        optimizer.step()
    assert all(np.isfinite(values)) and 0.1 < values[0] < 2
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.8 * values[0], values


def test_shuffled_images_move_the_image_inputs_and_keep_the_text():
    tweets, tables = tiny_bga_dataset()
    visuals, _ = _store(tables).lookup_table(tweets)
    shuffled = shuffled_images(visuals, seed=13)

    def images(items) -> list:
        return [None if v.image is None else tuple(v.image.tolist()) for v in items]

    assert images(shuffled) == images(shuffled_images(visuals, seed=13))
    assert images(shuffled) != images(shuffled_images(visuals, seed=14))
    assert shuffled[0] is visuals[0] and shuffled[1] is visuals[1]  # no image; null features: nothing to swap
    with_image = [i for i, v in enumerate(visuals) if v.image is not None]
    assert with_image == [2, 3, 4, 5, 6, 7]
    assert sum(a != b for a, b in zip(images(shuffled), images(visuals))) >= 4
    assert sorted(images(shuffled)[2:]) == sorted(images(visuals)[2:])  # a permutation of the same images
    for item in shuffled:  # the regions travel with their image
        assert item.embeddings is None if item.image is None else any(
            np.array_equal(item.embeddings, v.embeddings) and np.array_equal(item.image, v.image) for v in visuals[2:])
    for i in range(len(visuals)):
        assert (shuffled[i].text is None) == (visuals[i].text is None)
        if visuals[i].text is not None:
            assert np.array_equal(shuffled[i].text, visuals[i].text)


def test_generation_losses_are_masked_for_tweets_without_image():
    tweets, tables = tiny_bga_dataset()
    model = _model(tweets).eval()
    data = _data(model, tweets, tables)
    losses = model.generation_losses(data.batch([2, 4, 5, 6]))
    assert all(losses[term].item() > 0 for term in TERMS)
    # Tweet 0 has no image and tweet 1 null features: no term sees them, as anchor or as negative.
    with_missing = model.generation_losses(data.batch([0, 2, 1, 4, 5, 6]))
    for term in TERMS:
        torch.testing.assert_close(with_missing[term], losses[term])
    assert all(value.item() == 0 for value in model.generation_losses(data.batch([0, 1])).values())
    # Without images the loss is the CRF's: of the text-only pass and of the fused pass (on generated slots).
    no_image = data.batch([0, 1])
    text_pass = -model.crf(CRFTagger.emissions(model, no_image), no_image["labels"], mask=no_image["word_mask"])
    fused_pass = -model.crf(model.emissions(no_image), no_image["labels"], mask=no_image["word_mask"])
    assert model.loss(no_image).item() == pytest.approx((text_pass + fused_pass).item() / 2, rel=1e-6)
    text_only = _model(tweets, inference="text_only").eval()
    assert text_only.interaction is None
    assert text_only.loss(no_image).item() == CRFTagger.loss(text_only, no_image).item()
    # Tweet 3 has an image but no CLIP text embedding: only the clip_text term leaves it out.
    without_text = model.generation_losses(data.batch([2, 3, 4, 5, 6]))
    assert without_text["image"] != losses["image"]
    torch.testing.assert_close(without_text["clip_text"], losses["clip_text"])
    counts = model.sampler.counts["stage_1"]
    assert (counts["no_image"], counts["no_regions"]) == (6, 0)  # tweets 0 and 1, in three batches


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce", "cosine", "both"])
def test_generation_losses_fall_and_train_heads_and_encoder(loss):
    tweets, tables = tiny_bga_dataset()
    model = _model(tweets, loss=loss)
    data = _data(model, tweets, tables)
    batch = data.batch(range(2, 8))

    total = sum(model.generation_losses(batch).values())
    total.backward()
    heads = ("pool", "text_to_object", "object_to_image", "visual_to_text", "text_to_clip")
    for name in heads:
        grads = [p.grad for p in getattr(model.generation, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = {term: value.item() for term, value in model.generation_losses(batch).items()}
    for _ in range(15):
        optimizer.zero_grad()
        sum(model.generation_losses(batch).values()).backward()
        optimizer.step()
    last = {term: value.item() for term, value in model.generation_losses(batch).items()}
    assert all(last[term] < first[term] for term in TERMS), (first, last)


@pytest.mark.slow
def test_without_images_training_is_the_text_taggers():
    tweets, tables = tiny_bga_dataset(images=False)
    empty = {key: table.slice(0, 0) for key, table in tables.items()}
    bga = _model(tweets, inference="text_only")
    fit_tagger(bga, _data(bga, tweets, empty), tweets, TINY_TRAIN, seed=0)
    text_only = seeded_tagger(tweets)
    fit_tagger(text_only, tweets, tweets, TINY_TRAIN, seed=0)
    ours = bga.state_dict()
    for key, value in text_only.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert bga.sampler.counts["stage_1"]["no_image"] == 2 * len(tweets)


def test_save_load_and_gmner_predict_without_visual_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: prediction must not need it
    tweets, tables = tiny_bga_dataset()
    model = _model(tweets)
    _data(model, tweets, tables)  # feature statistics, saved as buffers
    with torch.no_grad():
        for p in [*model.classifier.parameters(), *model.generation.parameters()]:
            p.add_(torch.randn_like(p))
    model.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "model.json").read_text())
    assert config["kind"] == "bga" and config["visual"]["thresholds"] == [-1.0, 0.0, 0.2]

    loaded = load_predictor(tmp_path / "model", torch.device("cpu"))
    assert isinstance(loaded, predictor.TaggerPredictor)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.tagger.state_dict()[key], value), key
    expected = model.predict_entities(tweets.column("tokens").to_pylist())
    assert loaded.predict(tweets).column("entities").to_pylist() == expected

    # `gmner predict` on text alone, and with an image path that is not even there.
    monkeypatch.setitem(predictor.LAZY_LOADERS, "bga", "gmner.models.bga")
    lines = [{"tokens": tweets.column("tokens")[2].as_py(), "image": "missing.png"}, {"text": "RT Ann Lee visits Oslo"}]
    predicted, out = gmner_predict(tmp_path / "model", lines)
    assert predicted == 2
    assert [(e["start"], e["end"], e["type"]) for e in out[0]["entities"]] == [
        (e["start"], e["end"], e["type"]) for e in expected[2]]


@pytest.mark.slow
def test_run_stage_writes_model_and_dvclive(tmp_path):
    splits = {split: tiny_bga_dataset(split=split) for split in ("train", "dev")}
    write_splits(tmp_path, {split: tweets for split, (tweets, _) in splits.items()})
    write_tables(tmp_path, {key: pa.concat_tables(tables[key] for _, tables in splits.values())
                            for key in splits["train"][1]})
    group = {"top_k": K, "hidden": 8, "stage_epochs": [1, 2], "thresholds": [-1.0, 0.5], "fit": {"epochs": 2}}
    run_stage({"base": {"seed": 0, "device": "cpu"}, "train": dict(TINY_TRAIN, epochs=5), "train_bga": group},
              tmp_path)

    model_dir = tmp_path / "models" / "bga"
    assert json.loads((model_dir / "model.json").read_text())["kind"] == "bga"
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["history"]) == 2  # train_bga.fit overrides train
    sampler = summary["train_sampler"]
    assert set(sampler) == {"stage_1", "stage_2"}
    assert sampler["stage_1"]["pairs"] == sampler["stage_2"]["pairs"] == 6  # 8 tweets, 2 without features
    assert sampler["stage_1"]["regions_kept"] == 6 * K > 0
    assert (tmp_path / "dvclive" / "bga" / "metrics.json").is_file()

    for path in (tmp_path / "data").glob("**/*.parquet"):  # prediction reads no visual table
        if path.parent.name != "prepared":
            path.unlink()
    dev = pq.read_table(tmp_path / "data" / "prepared" / "dev.parquet")
    assert load_predictor(model_dir, torch.device("cpu")).predict(dev).num_rows == dev.num_rows


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_samplers_counts(tmp_path, monkeypatch):
    params = {"base": {"seed": 0, "device": "cpu", "cache_root": ".cache"}, "train": dict(TINY_TRAIN, epochs=3),
              "train_bga": {"top_k": K, "hidden": 8, "stage_epochs": [1, 2], "thresholds": [-1.0, 0.5]}}
    roots = []
    for name in ("whole", "resumed"):
        splits = {split: tiny_bga_dataset(split=split) for split in ("train", "dev")}
        write_splits(tmp_path / name, {split: tweets for split, (tweets, _) in splits.items()})
        roots.append(write_tables(tmp_path / name, {key: pa.concat_tables(tables[key] for _, tables in splits.values())
                                                    for key in splits["train"][1]}))
    run_stage(params, roots[0])
    with monkeypatch.context() as patch:
        kill_after_checkpoint(patch, 2)
        with pytest.raises(Killed):
            run_stage(params, roots[1])
    run_stage(params, roots[1])
    same_run(*roots, "bga", ["head.safetensors", "encoder/model.safetensors"], "train_summary.json")

