"""The pretrain stage: each alignment objective and its switch, learning, the checkpoint, and fine-tuning from it."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from gmner.core import schema
from gmner.core.params import ParamError, seed_everything
from gmner.models.grounded_tagger import GroundedTagger
from gmner.models.losses import InfoNCE
from gmner.models.text_encoder import load_text_encoder
from gmner.models.visual_store import VisualStore, collate_visual, feature_statistics
from gmner.pretrain.checkpoint import COMPONENTS, PretrainConfig, encoder_spec, read_checkpoint
from gmner.pretrain.model import AlignmentModel
from gmner.pretrain.objectives import global_local_loss, pair_relevance
from gmner.training.grounded import build_grounded
from gmner.training.grounded import run_stage as run_grounded
from gmner.training.pretrain import AlignmentSet, evaluate, fit_alignment, model_config, run_stage

from helpers import (
    BOXES,
    DIM,
    TINY_TRAIN,
    K,
    Killed,
    kill_after_checkpoint,
    same_run,
    tiny_dataset,
    write_splits,
    write_tables,
)

N = 12
IRRELEVANT = "5"  # the tweet whose original image the synthesize stage judged irrelevant
NO_MASKED = "3"  # the tweet whose image has no masked row
OTHER_BOX = "4"  # the tweet whose image's masked row holds only a box of no entity of it
FIT = {"epochs": 8, "batch_size": 4, "lr": 1e-3, "head_lr": 1e-2, "weight_decay": 0.01, "warmup_ratio": 0.1,
       "max_grad_norm": 1.0}
HEAD = {"negatives": 4, "connector": {"dropout": 0.0}}
VTC = {"sgla": True, "objects": "connector"}  # DLRAM plus every VTC extra: all COMPONENTS
DLRAM = ("tia", "eoa", "gate")  # the default components
# The weights only each component trains (besides what they share: the encoder, g_v, the object map).
OWNER = {"tia": "text_projection.", "eoa": "nce.eoa.", "global": "nce.sgla.", "local": "nce.sgla.",
         "balance": "connector.moe.router.", "gate": "gate."}


def _tables() -> dict:
    """``tiny_dataset`` (tweet 0 without image, tweet 1 with null features) with a word telling the tweets
    apart, plus the synthesize stage's table (an image per tweet, one per LOC entity, tweet 5 irrelevant), the
    generated images' features and the masked images (per image its PER's gold box and a box of no entity,
    null for tweet 1's unreadable image, none for tweet 3's, tweet 4's without its gold box); keyed as
    DEFAULT_PATHS, with the tweets under "tweets"."""
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
    masked = []
    for r in rows[1:]:
        if r["tweet_id"] == NO_MASKED:
            continue
        gold = r["entities"][0]["boxes"]
        boxes = [BOXES[2]] + ([] if r["tweet_id"] == OTHER_BOX else gold)
        unreadable = r["tweet_id"] == "1"
        masked.append({"image_sha256": r["image_sha256"], "boxes": boxes, "skip_reason": "corrupt_image" if unreadable
                       else None, "embeddings": None if unreadable else rng.normal(size=(len(boxes), DIM)).tolist()})
    return {
        "tweets": pa.Table.from_pylist(rows, schema=schema.TWEETS),
        "regions": regions, "region_features": region_features, "image_features": image_features,
        "synthesized": pa.Table.from_pylist(synthesized, schema=schema.SYNTHESIZED),
        "generated_features": pa.Table.from_pylist(generated, schema=schema.image_features_schema(DIM)),
        "masked_features": pa.Table.from_pylist(masked, schema=schema.masked_features_schema(DIM)),
    }


def _store(tables: dict) -> VisualStore:
    extra = {key: tables[key] for key in ("synthesized", "generated_features", "masked_features")}
    return VisualStore(tables["regions"], tables["region_features"], tables["image_features"], top_k=K,
                       extras=("generated", "masked"), extra_tables=extra)


def _model(tables: dict, **switches) -> tuple[AlignmentModel, AlignmentSet]:
    seed_everything(0)
    words = [w for tokens in tables["tweets"].column("tokens").to_pylist() for w in tokens]
    encoder, tokenizer = load_text_encoder("tiny", TINY_TRAIN["tiny"], words)
    model = AlignmentModel(encoder, tokenizer, PretrainConfig(visual_dim=DIM, top_k=K, **{**HEAD, **switches}),
                           TINY_TRAIN["max_length"], encoder_spec(TINY_TRAIN))
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


def test_masked_images_are_those_of_the_tweets_own_gold_boxes():
    tables = _tables()
    visuals, counts = _store(tables).lookup_table(tables["tweets"])
    rows = {r["image_sha256"]: r for r in tables["masked_features"].to_pylist()}
    for i in (2, 5, 6):  # the embedding of its PER's gold box, not that of the other box
        row = rows[f"sha{i}"]
        assert row["boxes"][1] == BOXES[i % 2] and np.allclose(visuals[i].masked, [row["embeddings"][1]])
    assert visuals[0].masked is None  # no image
    assert visuals[1].masked is None and visuals[3].masked is None  # a null row, no row
    assert visuals[4].masked.shape == (0, DIM)  # its row lacks its gold box
    assert counts["masked_missing"] == 2 and counts["masked_box_missing"] == 1
    batch = collate_visual([visuals[i] for i in (0, 1, 2, 3, 4, 5)], DIM)
    assert batch["masked_tweet"].tolist() == [2, 5] and batch["masked_features"].shape == (2, DIM)
    empty = collate_visual(visuals[:2], DIM)
    assert empty["masked_features"].shape == (0, DIM) and empty["masked_tweet"].shape == (0,)
    # TIA without the masked images would be a silent 0: refused.
    model = _model(tables)[0]
    generated = {key: tables[key] for key in ("synthesized", "generated_features")}
    store = VisualStore(tables["regions"], tables["region_features"], tables["image_features"], top_k=K,
                        extras=("generated",), extra_tables=generated)
    with pytest.raises(ValueError, match="masked"):
        AlignmentSet(model, tables["tweets"], store)


def test_dlram_is_the_default_and_its_objects_are_linear():
    cfg = PretrainConfig(visual_dim=DIM)
    assert (cfg.tia, cfg.eoa, cfg.t2i, cfg.sgla, cfg.gate, cfg.objects) == (True, True, True, False, True, "linear")
    assert cfg.components == DLRAM and cfg.connector["moe"]  # the connector's MoE is no balance term here
    model, data = _model(_tables())
    assert isinstance(model.objects, torch.nn.Linear) and not hasattr(model, "connector")
    assert not any(n.startswith("connector.") for n, _ in model.named_parameters())
    assert set(_losses(model, data)[0]) == set(DLRAM)
    # No objective reads the objects: no object map at all; VTC's connector instead of the linear map.
    assert not hasattr(_model(_tables(), eoa=False)[0], "objects")
    vtc = _model(_tables(), objects="connector")[0]
    assert not hasattr(vtc, "objects") and vtc.cfg.components == (*DLRAM[:2], "balance", "gate")
    with pytest.raises(ValueError, match="objects must be"):
        PretrainConfig(visual_dim=DIM, objects="mlp")


def test_one_step_gives_every_component_a_finite_loss_and_gradient():
    model, data = _model(_tables(), **VTC)
    parts, counts = _losses(model, data)
    assert set(parts) == set(COMPONENTS) == set(model.cfg.components)
    for name, value in parts.items():
        # Eq. 2 leaves the positive out of its denominator: a reflection loss may be negative.
        assert torch.isfinite(value) and (value.item() != 0 if name == "tia" else value.item() > 0), name
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
    # Every tweet with an image is a TIA anchor; the pool holds the masked images of all but tweets 3 and 4.
    assert counts["tia_anchors"] == N - 2 and counts["tia_masked_images"] == N - 4
    # The gate's alpha weights tia and the coupling's relevance local; both are reported before the weight.
    after = model.losses(data.batch(list(range(N))), np.random.default_rng(0))
    assert set(after.unweighted) == {"tia", "local"}
    assert 0 < after.components["local"].item() < after.unweighted["local"]
    fixed = _model(_tables(), gate=False, coupling=False, **VTC)[0]
    assert not fixed.losses(data.batch([2, 3]), np.random.default_rng(0)).unweighted


def _projected(model: AlignmentModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g_t(t_CLS), g_v(image) and g_v(masked images) of a batch, computed here from the model's modules."""
    hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (batch["input_ids"][:, 0] == model.tokenizer.cls_token_id).all()  # t_CLS is the first state
    image = model.image(model.visual.standardise(batch["image_features"], "image"))
    masked = model.image(model.visual.standardise(batch["masked_features"], "image"))
    return model.text_projection(hidden[:, 0]), image, masked


def test_reflection_puts_every_masked_image_of_the_batch_in_each_denominator():
    model, data = _model(_tables())
    nce = model.nce["tia"]
    with torch.no_grad():
        # One tweet: its own masked image is the whole pool, L = (s(t, m) - s(t, v)) / tau.
        text, image, masked = _projected(model, data.batch([2]))
        own = nce.scale * (F.cosine_similarity(text, masked) - F.cosine_similarity(text, image))
        assert model.losses(data.batch([2]), np.random.default_rng(0)).unweighted["tia"] == pytest.approx(
            own.item(), rel=1e-5)
        # Three tweets, two masked images (tweet 3 has none): L_i = -s_ii / tau + log sum_j exp(s_ij / tau).
        text, image, masked = _projected(model, data.batch([2, 3, 6]))
        unit = F.normalize(text, dim=-1)
        s = nce.scale.item() * (unit @ F.normalize(masked, dim=-1).T)
        positive = nce.scale.item() * F.cosine_similarity(text, image)
        expected = sum(-positive[i].item() + math.log(sum(math.exp(x) for x in s[i].tolist())) for i in range(3))
        got = model.losses(data.batch([2, 3, 6]), np.random.default_rng(0)).unweighted["tia"]
        assert got == pytest.approx(expected / 3, rel=1e-5)


def test_alpha_weights_only_the_reflection_term():
    model, data = _model(_tables())
    batch = data.batch(list(range(N)))
    before = model.losses(batch, np.random.default_rng(0))
    with torch.no_grad():  # alpha = 0.25 for every tweet
        model.gate.linear.weight.zero_()
        model.gate.linear.bias.fill_(math.log(0.25 / 0.75))
    quarter = model.losses(batch, np.random.default_rng(0))
    assert quarter.components["eoa"].item() == before.components["eoa"].item()  # EOA is not alpha-weighted
    assert quarter.unweighted["tia"] == pytest.approx(before.unweighted["tia"])
    assert quarter.components["tia"].item() == pytest.approx(0.25 * quarter.unweighted["tia"], rel=1e-5)
    assert before.components["tia"].item() != pytest.approx(quarter.components["tia"].item())
    # The gate learns from its verdicts only, never from the reflection term it weights.
    grads = _grads(model, quarter.components["tia"])
    assert not any(n.startswith("gate.") for n in grads)


def test_a_batch_without_masked_images_has_no_reflection_term():
    model, data = _model(_tables())
    parts, counts = _losses(model, data, [0, 1, 3])  # no image; null features; no masked row
    assert counts["tia_anchors"] == 1 and counts["tia_masked_images"] == 0 and counts["tia_empty_pool_batches"] == 1
    assert parts["tia"].item() == 0.0
    grads = _grads(model, model.total(parts))
    assert all(math.isfinite(g) for g in grads.values())
    assert not any(g > 0 for n, g in grads.items() if n.startswith(OWNER["tia"]))


@pytest.mark.parametrize(
    "switch, removed",
    [({"tia": False}, {"tia"}), ({"eoa": False}, {"eoa"}), ({"sgla": False}, {"global", "local"}),
     ({"gate": False}, {"gate"}), ({"connector": {"moe": False, "dropout": 0.0}}, {"balance"}),
     ({"objects": "linear"}, {"balance"}), ({"eoa": False, "sgla": False}, {"eoa", "global", "local", "balance"})],
)
def test_each_switch_removes_its_component_and_its_parameters_learn_nothing(switch, removed):
    model, data = _model(_tables(), **{**VTC, **switch})
    parts, _ = _losses(model, data)
    assert set(parts) == set(COMPONENTS) - removed == set(model.cfg.components)
    grads = _grads(model, model.total(parts))
    for name in removed:
        assert not any(g > 0 for n, g in grads.items() if n.startswith(OWNER[name])), name
    if {"eoa", "local"} <= removed:  # nothing reads the objects: no object map
        assert not hasattr(model, "connector") and not hasattr(model, "objects")
    assert (model.gate is None) == ("gate" in removed)
    assert hasattr(model, "text_projection") == ("tia" not in removed)


def test_t2i_and_coupling_switches():
    tables = _tables()
    on, data = _model(tables, **VTC)
    off, off_data = _model(tables, t2i=False, **VTC)
    parts_on, counts_on = _losses(on, data)
    parts_off, counts_off = _losses(off, off_data)
    assert counts_on["positive_generated"] == N - 2 and counts_off["positive_generated"] == 0
    assert counts_off["left_out"] == N - 2  # the LOC entities, absent from their images
    assert counts_off["images_generated"] == 0 and counts_on["images_generated"] == 1
    assert parts_on["tia"] != parts_off["tia"]  # tweet 5's anchor image
    uncoupled, data = _model(tables, coupling=False, **VTC)
    parts = _losses(uncoupled, data)[0]
    assert parts["global"] == parts_on["global"] and parts["local"] > parts_on["local"]  # relevance < 1


def test_the_coupling_weight_of_a_pair_is_the_same_in_a_batch_of_2_and_of_8():
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)
    entities, objects = torch.randn(8, 2, 6, generator=generator), torch.randn(8, 3, 6, generator=generator)
    nce = InfoNCE(0.07)

    def terms(n: int, coupling: bool = True) -> dict:
        return global_local_loss(nce, image[:n], text[:n], entities[:n], torch.ones(n, 2, dtype=torch.bool),
                                 objects[:n], torch.ones(n, 3, dtype=torch.bool), coupling)

    small, large = terms(2), terms(8)
    torch.testing.assert_close(small["relevance"], large["relevance"][:2], rtol=0, atol=0)
    expected = torch.sigmoid(F.cosine_similarity(image[:2], text[:2]) / 0.07)
    torch.testing.assert_close(small["relevance"], expected)
    # Each pair's local loss is its uncoupled one times its weight, in either batch.
    for n, coupled in ((2, small), (8, large)):
        uncoupled = terms(n, coupling=False)["local_pairs"]
        torch.testing.assert_close(coupled["local_pairs"], uncoupled * coupled["relevance"])
    # Hand-sized: orthogonal vectors weigh 1/2, aligned ones sigmoid(1 / 0.07), opposite ones its complement.
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert pair_relevance(nce, a, b).item() == pytest.approx(0.5)
    assert pair_relevance(nce, a, a).item() == pytest.approx(1 / (1 + math.exp(-1 / 0.07)))
    assert pair_relevance(nce, a, -a).item() == pytest.approx(1 / (1 + math.exp(1 / 0.07)), rel=1e-4)


def test_a_tweet_without_image_contributes_no_image_loss():
    model, data = _model(_tables(), **VTC)
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
# At its default weight (0.01) the balance term only regularises the routing the other terms learn, and may
# drift up; weighted like them it is trained, and falls too.
@pytest.mark.parametrize("switches", [{}, {**VTC, "weights": {"balance": 1.0}}], ids=["dlram", "vtc"])
def test_a_few_epochs_lower_each_component(switches):
    model, data = _model(_tables(), **switches)
    before = evaluate(model, data, batch_size=4, seed=0)
    fit = dict(FIT, epochs=12)  # 4-d random features: the masked pool is hard to tell from the images
    result = fit_alignment(model, data, None, fit, seed=0)
    after = evaluate(model, data, batch_size=4, seed=0)
    unweighted = {"tia_unweighted", "local_unweighted"} if switches else {"tia_unweighted"}
    assert set(before) == {*model.cfg.components, "loss", *unweighted}
    assert len(result["history"]) == fit["epochs"]
    for name in set(before) - {"tia"}:  # tia moves with alpha too, which rises as the gate learns
        assert after[name] < before[name], (name, before[name], after[name])
    assert result["counts"]["positive_region"] == N - 2  # counted over the first epoch


@pytest.mark.parametrize("switches", [{}, VTC], ids=["dlram", "vtc"])
def test_checkpoint_round_trip_gives_the_same_losses(tmp_path, switches):
    model, data = _model(_tables(), **switches)
    with torch.no_grad():  # weights far from their init, so a lost one would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save(tmp_path / "ckpt")
    loaded = AlignmentModel.load(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    expected, _ = _losses(model, data, seed=3)
    got, _ = _losses(loaded, AlignmentSet(loaded, _tables()["tweets"], _store(_tables())), seed=3)
    assert set(got) == set(model.cfg.components)
    for name in got:
        assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-6), name


def _same(state: dict, module: torch.nn.Module) -> bool:
    mine = module.state_dict()
    return state.keys() == mine.keys() and all(torch.equal(state[k], mine[k]) for k in mine)


def test_checkpoint_exposes_each_module_by_its_prefix(tmp_path):
    model, data = _model(_tables())
    model.save(tmp_path / "dlram")
    checkpoint = read_checkpoint(tmp_path / "dlram")
    assert checkpoint.config.objects == "linear"
    for prefix in ("visual", "image", "text_projection", "objects"):
        assert _same(checkpoint.module_state(prefix), getattr(model, prefix)), prefix
    assert set(checkpoint.module_state("visual")) == {"region_mean", "region_std", "image_mean", "image_std"}
    assert torch.equal(checkpoint.module_state("visual")["image_std"], model.visual.image_std)
    assert not torch.equal(model.visual.image_std, torch.ones(DIM))  # real statistics, not the initial ones
    assert checkpoint.module_state("connector") == {} and checkpoint.module_state("object") == {}
    vtc = _model(_tables(), objects="connector", tia=False)[0]
    vtc.save(tmp_path / "vtc")
    checkpoint = read_checkpoint(tmp_path / "vtc")
    assert _same(checkpoint.module_state("connector"), vtc.connector)
    assert checkpoint.module_state("objects") == {} and checkpoint.module_state("text_projection") == {}
    assert checkpoint.module_state("image") == {}  # neither tia nor sgla: no g_v


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
    assert summary["train_visual"]["masked_missing"] == 2  # tweets 1 and 3
    assert len(summary["history"]) == 2 and summary["components"] == list(DLRAM)
    plots = root / "dvclive" / "pretrain" / "plots" / "metrics"
    for split in ("train", "dev"):
        for name in DLRAM:
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


def test_params_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown param"):
        model_config({"tia": True, "epoch": 3}, DIM)
    with pytest.raises(ValueError, match="unknown param"):  # the masked-region TIA's settings are gone
        model_config({"reflection_hidden": 64}, DIM)
    with pytest.raises(ValueError, match="unknown components"):
        PretrainConfig(visual_dim=DIM, weights={"tia": 1.0, "align": 1.0})
    with pytest.raises(ValueError, match="must not hold"):
        PretrainConfig(visual_dim=DIM, connector={"text_dim": 8})
    # A checkpoint of the older model is refused with what to do.
    _model(_tables())[0].save(tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "pretrain.json").read_text())
    saved["config"].update(reflection_hidden=64, reflection_heads=4)
    (tmp_path / "old" / "pretrain.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="rerun the pretrain stage"):
        read_checkpoint(tmp_path / "old")


@pytest.mark.parametrize("objects", ["linear", "connector"])
def test_grounded_init_takes_the_encoder_and_a_connector_only_from_a_connector_checkpoint(tmp_path, objects):
    tables = _tables()
    root = _root(tmp_path, tables)
    pretrained = _model(tables, objects=objects)[0]
    pretrained.save(root / "models" / "pretrain")
    params = _params(objects=objects)
    params["train_grounded"]["init"] = "pretrain"
    store, tweets = _store(tables), tables["tweets"]
    tagger = build_grounded(params, root, tweets, store)
    assert tagger.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()
    assert _same(pretrained.encoder.state_dict(), tagger.encoder)
    connector = tagger.head.visual.connector
    if objects == "linear":  # nothing to start a connector from: none, unless asked for (then a fresh one)
        assert connector is None and tagger.visual_cfg.connector is None
        params["train_grounded"]["connector"] = True
        fresh = build_grounded(params, root, tweets, store)
        assert fresh.visual_cfg.connector == model_config(params["pretrain"], DIM).connector
        assert _same(pretrained.encoder.state_dict(), fresh.encoder) and fresh.head.visual.connector is not None
    else:
        assert _same(pretrained.connector.state_dict(), connector)
        assert tagger.visual_cfg.connector == pretrained.cfg.connector


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretrain_stage_checkpoint(tmp_path):
    tables = _tables()
    root = _root(tmp_path, tables)
    params = _params(**VTC)
    run_stage(params, root)
    pretrained = AlignmentModel.load(root / "models" / "pretrain")
    store = _store(tables)
    tweets = tables["tweets"]

    params["train_grounded"]["init"] = "pretrain"
    tagger = build_grounded(params, root, tweets, store)
    for ours, theirs in ((tagger.encoder, pretrained.encoder), (tagger.head.visual.connector, pretrained.connector)):
        assert _same(theirs.state_dict(), ours)

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
    # Both are the init param's one-line errors.
    with pytest.raises(ParamError, match="^train_grounded.init: .*rerun the pretrain stage"):
        build_grounded(other, root, tweets, store)
    with pytest.raises(ParamError, match="^train_grounded.init: .*not a pretrain checkpoint"):
        build_grounded({**params, "train_grounded": {**params["train_grounded"], "init": str(tmp_path / "none")}},
                       root, tweets, store)


@pytest.mark.slow
def test_a_killed_pretrain_run_resumes_to_the_same_checkpoint_and_counts(tmp_path, monkeypatch):
    params = _params()
    params["base"]["cache_root"] = ".cache"
    params["pretrain"]["fit"]["epochs"] = 3
    whole, resumed = (_root(tmp_path / name, _tables()) for name in ("whole", "resumed"))
    run_stage(params, whole)
    with monkeypatch.context() as patch:
        kill_after_checkpoint(patch, 1)
        with pytest.raises(Killed):
            run_stage(params, resumed)
    run_stage(params, resumed)  # epochs 2 and 3, with the negatives sampler and first-epoch counts restored
    same_run(whole, resumed, "pretrain", ["heads.safetensors", "encoder/model.safetensors"], "pretrain_summary.json")

