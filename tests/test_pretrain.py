"""The pretrain stage: each alignment objective and its switch, learning, the checkpoint, and fine-tuning from it."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gmner.core import schema
from gmner.core.params import seed_everything
from gmner.models.grounded_tagger import GroundedTagger
from gmner.models.text_encoder import load_text_encoder
from gmner.models.visual_store import VisualStore, feature_statistics
from gmner.pretrain.checkpoint import COMPONENTS, PretrainConfig, read_checkpoint
from gmner.pretrain.model import AlignmentModel
from gmner.training.grounded import build_grounded
from gmner.training.grounded import run_stage as run_grounded
from gmner.training.pretrain import AlignmentSet, evaluate, fit_alignment, model_config, run_stage

from helpers import DIM, TINY_TRAIN, K, tiny_dataset, write_splits, write_tables

N = 12
IRRELEVANT = "5"  # the tweet whose original image the synthesize stage judged irrelevant
FIT = {"epochs": 8, "batch_size": 4, "lr": 1e-3, "head_lr": 1e-2, "weight_decay": 0.01, "warmup_ratio": 0.1,
       "max_grad_norm": 1.0}
HEAD = {"negatives": 4, "reflection_hidden": 8, "reflection_heads": 2, "connector": {"dropout": 0.0}}
# The weights only each component trains (besides what they share: the encoder, the connector).
OWNER = {"tia": "reflection.", "eoa": "nce.eoa.", "global": "image.", "local": "nce.sgla.",
         "balance": "connector.moe.router.", "gate": "gate."}


def _tables() -> dict:
    """``tiny_dataset`` (tweet 0 without image, tweet 1 with null features) with a word telling the tweets
    apart, plus the synthesize stage's table (an image per tweet, one per LOC entity, tweet 5 irrelevant) and
    the generated images' features; keyed as DEFAULT_PATHS, with the tweets under "tweets"."""
    tweets, regions, region_features, image_features = tiny_dataset(N)
    rows = tweets.to_pylist()
    for row in rows:
        row["tokens"] = ["RT", "Ann", "Lee", f"visit{row['tweet_id']}", "Oslo"]
    synthesized = [{
        "tweet_id": r["tweet_id"], "split": "train", "prompt": "p", "image_path": "g.png",
        "image_sha256": f"gen{r['tweet_id']}", "seed": 0, "relevance": None, "skip_reason": None,
        "relevant": None if r["image_sha256"] is None else r["tweet_id"] != IRRELEVANT,
        "entities": [{"start": 4, "end": 5, "type": "LOC", "text": "Oslo", "prompt": "p", "image_path": "e.png",
                      "image_sha256": f"ent{r['tweet_id']}"}],
    } for r in rows]
    rng = np.random.default_rng(1)
    generated = [{"image_sha256": f"{kind}{r['tweet_id']}", "embedding": rng.normal(size=DIM).tolist(),
                  "skip_reason": None} for kind in ("gen", "ent") for r in rows]
    return {
        "tweets": pa.Table.from_pylist(rows, schema=schema.TWEETS),
        "regions": regions, "region_features": region_features, "image_features": image_features,
        "synthesized": pa.Table.from_pylist(synthesized, schema=schema.SYNTHESIZED),
        "generated_features": pa.Table.from_pylist(generated, schema=schema.image_features_schema(DIM)),
    }


def _store(tables: dict) -> VisualStore:
    extra = {key: tables[key] for key in ("synthesized", "generated_features")}
    return VisualStore(tables["regions"], tables["region_features"], tables["image_features"], top_k=K,
                       extras=("generated",), extra_tables=extra)


def _model(tables: dict, **switches) -> tuple[AlignmentModel, AlignmentSet]:
    seed_everything(0)
    words = [w for tokens in tables["tweets"].column("tokens").to_pylist() for w in tokens]
    encoder, tokenizer = load_text_encoder("tiny", TINY_TRAIN["tiny"], words)
    model = AlignmentModel(encoder, tokenizer, PretrainConfig(visual_dim=DIM, top_k=K, **{**HEAD, **switches}))
    data = AlignmentSet(model, tables["tweets"], _store(tables))
    model.set_feature_statistics(feature_statistics(data.visuals, DIM))
    return model.eval(), data


def _losses(model: AlignmentModel, data: AlignmentSet, indices=range(N), seed: int = 0):
    """(components, counts) of a batch."""
    return model.losses(data.batch(list(indices)), np.random.default_rng(seed))[:2]


def _grads(model: AlignmentModel, loss: torch.Tensor) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name: p.grad.abs().sum().item() for name, p in model.named_parameters() if p.grad is not None}


def test_one_step_gives_every_component_a_finite_positive_loss_and_gradient():
    model, data = _model(_tables())
    parts, counts = _losses(model, data)
    assert set(parts) == set(COMPONENTS) == set(model.cfg.components)
    for name, value in parts.items():
        assert torch.isfinite(value) and value.item() > 0, name
        grads = _grads(model, value)
        assert any(g > 0 for n, g in grads.items() if n.startswith(OWNER[name])), name
        if name != "balance":
            assert any(g > 0 for n, g in grads.items() if n.startswith("encoder.")), name
        if name in ("eoa", "local"):  # the objects come from the connector
            assert any(g > 0 for n, g in grads.items() if n.startswith("connector.project.")), name
    # One optimiser step on the weighted sum leaves every weight finite.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.zero_grad()
    model.total(parts).backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Tweets 0 and 1 have no usable image; each other PER has its gold region, each LOC its generated image.
    assert counts["no_image"] == 2 and counts["entities_without_image"] == 4
    assert counts["positive_region"] == counts["positive_generated"] == N - 2
    assert counts["images_generated"] == 1  # tweet 5's generated image stands in for its original
    # The gate's alpha and the coupling's relevance (in (0, 1)) weight tia / eoa and local; the losses before
    # those weights are reported beside them.
    unweighted = model.losses(data.batch(list(range(N))), np.random.default_rng(0)).unweighted
    assert set(unweighted) == {"tia", "eoa", "local"}
    assert all(0 < parts[name].item() < unweighted[name] for name in unweighted)
    fixed = _model(_tables(), gate=False, coupling=False)[0]
    assert not fixed.losses(data.batch([2, 3]), np.random.default_rng(0)).unweighted


@pytest.mark.parametrize(
    "switch, removed",
    [({"tia": False}, {"tia"}), ({"eoa": False}, {"eoa"}), ({"sgla": False}, {"global", "local"}),
     ({"gate": False}, {"gate"}), ({"connector": {"moe": False, "dropout": 0.0}}, {"balance"}),
     ({"eoa": False, "sgla": False}, {"eoa", "global", "local", "balance"})],
)
def test_each_switch_removes_its_component_and_its_parameters_learn_nothing(switch, removed):
    model, data = _model(_tables(), **switch)
    parts, _ = _losses(model, data)
    assert set(parts) == set(COMPONENTS) - removed == set(model.cfg.components)
    grads = _grads(model, model.total(parts))
    for name in removed:
        assert not any(g > 0 for n, g in grads.items() if n.startswith(OWNER[name])), name
    if {"eoa", "local"} <= removed:  # nothing reads the connector's objects
        assert not any(n.startswith("connector.") for n in grads)
    assert (model.gate is None) == ("gate" in removed) and (model.reflection is None) == ("tia" in removed)


def test_t2i_and_coupling_switches():
    tables = _tables()
    on, data = _model(tables)
    off, off_data = _model(tables, t2i=False)
    parts_on, counts_on = _losses(on, data)
    parts_off, counts_off = _losses(off, off_data)
    assert counts_on["positive_generated"] == N - 2 and counts_off["positive_generated"] == 0
    assert counts_off["left_out"] == N - 2  # the LOC entities, absent from their images
    assert counts_off["images_generated"] == 0 and counts_on["images_generated"] == 1
    assert parts_on["tia"] != parts_off["tia"]
    uncoupled, data = _model(tables, coupling=False)
    parts = _losses(uncoupled, data)[0]
    assert parts["global"] == parts_on["global"] and parts["local"] > parts_on["local"]  # relevance < 1


def test_a_tweet_without_image_contributes_no_image_loss():
    model, data = _model(_tables())
    alone, counts = _losses(model, data, [0, 1])  # no image; image with null features
    assert counts["entities_without_image"] == 4
    for name, value in alone.items():
        assert value.item() == 0, name
    grads = _grads(model, model.total(alone))
    assert not any(g > 0 for n, g in grads.items() if not n.startswith("gate."))  # gate: 0 * its output
    with_them, _ = _losses(model, data, [0, 1, 2, 3, 4])
    without, _ = _losses(model, data, [2, 3, 4])
    for name in COMPONENTS:
        assert with_them[name].item() == pytest.approx(without[name].item(), rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_a_few_epochs_lower_each_component():
    tables = _tables()
    model, data = _model(tables)
    before = evaluate(model, data, batch_size=4, seed=0)
    result = fit_alignment(model, data, None, FIT, seed=0)
    after = evaluate(model, data, batch_size=4, seed=0)
    assert set(before) == {*COMPONENTS, "loss", "tia_unweighted", "eoa_unweighted", "local_unweighted"}
    assert len(result["history"]) == FIT["epochs"]
    for name in before:
        assert after[name] < before[name], (name, before[name], after[name])
    assert result["counts"]["positive_region"] == N - 2  # counted over the first epoch


def test_checkpoint_round_trip_gives_the_same_losses(tmp_path):
    model, data = _model(_tables())
    with torch.no_grad():  # weights far from their init, so a lost one would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save(tmp_path / "ckpt")
    loaded = AlignmentModel.load(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    expected, _ = _losses(model, data, seed=3)
    got, _ = _losses(loaded, AlignmentSet(loaded, _tables()["tweets"], _store(_tables())), seed=3)
    for name in COMPONENTS:
        assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-6), name


def _root(tmp_path: Path, tables: dict) -> Path:
    """A pipeline root with the tiny tables in place (the dev split = the train tweets)."""
    write_splits(tmp_path, {"train": tables["tweets"], "dev": tables["tweets"]})
    return write_tables(tmp_path, {key: table for key, table in tables.items() if key != "tweets"})


def _params(**pretrain) -> dict:
    return {
        "base": {"seed": 0, "device": "cpu"},
        "train": dict(TINY_TRAIN, epochs=1, threads=1),
        "pretrain": {"top_k": K, **HEAD, "fit": dict(FIT, epochs=2, threads=1), **pretrain},
        "train_grounded": {"top_k": K, "hidden": 8, "heads": 2},
    }


@pytest.mark.slow
def test_run_stage_writes_checkpoint_and_curves_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    root = _root(tmp_path, _tables())
    run_stage(_params(), root)
    out = root / "models" / "pretrain"
    assert {p.name for p in out.iterdir()} == {"encoder", "heads.safetensors", "pretrain.json", "pretrain_summary.json"}
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["counts"]["positive_region"] == N - 2 and summary["counts"]["images_generated"] == 1
    assert len(summary["history"]) == 2 and set(summary["components"]) == set(COMPONENTS)
    plots = root / "dvclive" / "pretrain" / "plots" / "metrics"
    for split in ("train", "dev"):
        for name in COMPONENTS:
            assert len((plots / split / f"{name}.tsv").read_text().splitlines()) == 3  # header + 2 epochs
    assert read_checkpoint(out).config == model_config(_params()["pretrain"], DIM)

    # A run that fails while saving leaves the previous checkpoint whole, and no temporary folder behind.
    def broken_save(self, model_dir):
        (Path(model_dir) / "pretrain.json").write_text("partial")
        raise OSError("disk full")

    before = (out / "heads.safetensors").read_bytes()
    monkeypatch.setattr(AlignmentModel, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run_stage(_params(), root)
    assert (out / "heads.safetensors").read_bytes() == before
    assert json.loads((out / "pretrain.json").read_text())["kind"] == "alignment_pretrain"
    assert [p.name for p in out.parent.iterdir()] == ["pretrain"]


def test_params_are_checked():
    with pytest.raises(ValueError, match="unknown param"):
        model_config({"tia": True, "epoch": 3}, DIM)
    with pytest.raises(ValueError, match="unknown components"):
        PretrainConfig(visual_dim=DIM, weights={"tia": 1.0, "align": 1.0})
    with pytest.raises(ValueError, match="must not hold"):
        PretrainConfig(visual_dim=DIM, connector={"text_dim": 8})


@pytest.mark.slow
def test_fine_tuning_starts_from_the_checkpoint_encoder_and_connector(tmp_path):
    tables = _tables()
    root = _root(tmp_path, tables)
    params = _params()
    run_stage(params, root)
    pretrained = AlignmentModel.load(root / "models" / "pretrain")
    store = _store(tables)
    tweets = tables["tweets"]

    params["train_grounded"]["init"] = "pretrain"
    tagger = build_grounded(params, root, tweets, store)
    assert tagger.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()
    for ours, theirs in ((tagger.encoder, pretrained.encoder), (tagger.head.visual.connector, pretrained.connector)):
        mine, saved = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == saved.keys() and all(torch.equal(mine[k], saved[k]) for k in mine)
    assert tagger.visual_cfg.connector == pretrained.cfg.connector

    # The same architecture from scratch: a connector of the pretrain params' shape, fresh weights.
    scratch = build_grounded({**params, "train_grounded": {**params["train_grounded"], "init": "none",
                                                           "connector": True}}, root, tweets, store)
    assert scratch.visual_cfg == tagger.visual_cfg
    assert not torch.equal(scratch.head.visual.connector.project[0].weight, pretrained.connector.project[0].weight)
    # Neither: the linear candidate projection, as before.
    assert build_grounded(params | {"train_grounded": {"top_k": K, "hidden": 8, "heads": 2}}, root, tweets,
                          store).head.visual.connector is None

    # Fine-tuning end to end, its model (with the connector) saved and loaded back.
    run_grounded(params, root, name="grounded_init")
    loaded = GroundedTagger.load(root / "models" / "grounded_init")
    assert loaded.visual_cfg.connector == pretrained.cfg.connector and loaded.head.visual.connector is not None

    # Another text encoder than the checkpoint's is refused.
    other = {**params, "train": dict(params["train"], tiny=dict(TINY_TRAIN["tiny"], hidden_size=32))}
    with pytest.raises(ValueError, match="rerun the pretrain stage"):
        build_grounded(other, root, tweets, store)
    with pytest.raises(FileNotFoundError, match="pretrain checkpoint"):
        build_grounded({**params, "train_grounded": {**params["train_grounded"], "init": str(tmp_path / "none")}},
                       root, tweets, store)
