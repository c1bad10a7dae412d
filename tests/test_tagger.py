"""The CRF text tagger: word alignment, training stage, checkpoint round trip, predictor, offline errors."""

from __future__ import annotations

import json
import logging

import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
import torch

from gmner.core import schema
from gmner.core.atomic import atomic_dir
from gmner.core.errors import DataError
from gmner.models import predictor
from gmner.models.tagger import CRFTagger, build_labels
from gmner.models.text_encoder import load_text_encoder
from gmner.training.loop import param_groups
from gmner.training.tagger import run_stage

from helpers import TINY, synthetic_tweets, write_splits


def params(**train) -> dict:
    cfg = {"encoder": "tiny", "tiny": TINY, "max_length": 64, "epochs": 8, "batch_size": 8, "lr": 0.002,
           "head_lr": 0.02, "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "dropout": 0.1}
    return {"base": {"seed": 3, "device": "cpu"}, "train": cfg | train}


def prepared_root(root):
    return write_splits(root, {"train": synthetic_tweets(40, 1, "train"), "dev": synthetic_tweets(16, 2, "dev")})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A root after a whole train stage (8 epochs): the tests reading it are slow."""
    torch.set_num_threads(1)
    root = prepared_root(tmp_path_factory.mktemp("trained"))
    run_stage(params(), root)
    return root


def untrained_tagger(max_length: int = 64) -> CRFTagger:
    torch.manual_seed(0)
    train = synthetic_tweets(40, 1, "train")
    words = [w for tokens in train.column("tokens").to_pylist() for w in tokens]
    encoder, tokenizer = load_text_encoder("tiny", TINY, words)
    return CRFTagger(encoder, tokenizer, build_labels(train.column("tags").to_pylist()), max_length).eval()


def test_labels_come_from_the_data():
    assert build_labels([["O", "B-ZOO", "I-ZOO"], ["B-AAA"]]) == ["O", "B-AAA", "I-AAA", "B-ZOO", "I-ZOO"]


@pytest.mark.slow
def test_training_lowers_loss_and_learns_the_pattern(trained):
    summary = json.loads((trained / "models" / "tagger" / "train_summary.json").read_text())
    losses = [row["train/loss"] for row in summary["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["best_dev_mner_f1"] > 60
    assert summary["best_dev_mner_f1"] == max(row["dev/mner_f1"] for row in summary["history"])
    assert summary["alignment"]["train"] == {"truncated_words": 0, "empty_words": 0}
    # Encoder and head learning rates decay to zero separately, head starting 10x higher.
    assert summary["history"][0]["train/lr_head"] == pytest.approx(10 * summary["history"][0]["train/lr_encoder"])
    assert summary["history"][-1]["train/lr_encoder"] == 0.0
    metrics = json.loads((trained / "dvclive" / "tagger" / "metrics.json").read_text())
    assert set(metrics) == {"train", "dev", "step", "best_epoch", "best_dev_mner_f1"} and metrics["step"] == 7
    assert metrics["best_dev_mner_f1"] == summary["best_dev_mner_f1"]
    assert not (trained / "dvc.yaml").exists() and not (trained / "dvclive" / "tagger" / "dvc.yaml").exists()
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["tagger"]  # no temp folder left


@pytest.mark.slow
def test_predictor_returns_the_schema_with_no_regions(trained):
    dev = pq.read_table(trained / "data" / "prepared" / "dev.parquet")
    pred = predictor.load(trained / "models" / "tagger").predict(dev)
    assert pred.schema == schema.PREDICTIONS
    assert pred.column("tweet_id").to_pylist() == dev.column("tweet_id").to_pylist()
    entities = [e for row in pred.column("entities").to_pylist() for e in row]
    assert entities and all(e["region"] is None and e["box"] is None for e in entities)


@pytest.mark.slow
def test_same_seed_gives_identical_predictions(trained, tmp_path):
    run_stage(params(), prepared_root(tmp_path))
    dev = pq.read_table(trained / "data" / "prepared" / "dev.parquet")
    first = predictor.load(trained / "models" / "tagger").predict(dev)
    second = predictor.load(tmp_path / "models" / "tagger").predict(dev)
    assert first.equals(second)
    summaries = [json.loads((r / "models" / "tagger" / "train_summary.json").read_text()) for r in (trained, tmp_path)]
    assert [h["train/loss"] for h in summaries[0]["history"]] == [h["train/loss"] for h in summaries[1]["history"]]


def test_save_load_round_trip_predicts_identically(tmp_path):
    tagger = untrained_tagger()
    with torch.no_grad():  # make the head non-trivial so that equality means something
        tagger.crf.transitions.normal_()
    tweets = synthetic_tweets(12, 5, "test").column("tokens").to_pylist() + [["unseen", "Zebra", "words"]]
    tagger.save(tmp_path / "m")
    loaded = CRFTagger.load(tmp_path / "m")
    assert loaded.labels == tagger.labels and len(loaded.tokenizer) == len(tagger.tokenizer)
    batch = tagger.collate(tagger.encode(tweets)[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.emissions(batch), tagger.emissions(batch), rtol=0, atol=0)
    assert loaded.predict_tags(tweets) == tagger.predict_tags(tweets)


def test_first_subword_carries_the_word_label():
    encoder, tokenizer = load_text_encoder("tiny", TINY, ["go", "go", "to", "to", "Zanzibar"])  # Zanzibar once: split
    tagger = CRFTagger(encoder, tokenizer, ["O", "B-LOC", "I-LOC"], max_length=32)
    (enc,), stats = tagger.encode([["go", "to", "Zanzibar", "to"]])
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert pieces[:4] == ["[CLS]", "go", "to", "Z"] and pieces[4:11] == [f"##{c}" for c in "anzibar"]
    assert enc.word_pos == [1, 2, 3, 11] and enc.word_idx == [0, 1, 2, 3]
    batch = tagger.collate([enc], [tagger.label_ids(["O", "O", "B-LOC", "O"])])
    assert batch["labels"].tolist() == [[0, 0, 1, 0]]
    assert batch["word_mask"].tolist() == [[True] * 4] and stats.truncated_words == 0


def test_context_is_appended_after_the_tweet_in_the_room_left_and_never_tagged():
    encoder, tokenizer = load_text_encoder("tiny", TINY, ["go", "to", "Oslo", "a", "red", "car"] * 2)
    tagger = CRFTagger(encoder, tokenizer, ["O", "B-LOC", "I-LOC"], max_length=9)
    (alone,), _ = tagger.encode([["go", "to", "Oslo"]])
    (with_caption, cut), _ = tagger.encode([["go", "to", "Oslo"]] * 2, [["a", "red", "car"], ["a", "red", "car"] * 3])
    pieces = tokenizer.convert_ids_to_tokens(with_caption.input_ids)
    assert pieces == ["[CLS]", "go", "to", "Oslo", "[SEP]", "a", "red", "car", "[SEP]"]
    assert (with_caption.word_pos, with_caption.word_idx) == (alone.word_pos, alone.word_idx)
    assert with_caption.tweet_len == 5 and alone.tweet_len == 5
    assert len(cut.input_ids) == 9 and cut.input_ids[-1] == tokenizer.sep_token_id  # cut to max_length
    none, _ = tagger.encode([["go", "to", "Oslo"]], [None])
    assert none[0] == alone
    batch = tagger.collate([with_caption, alone])
    assert batch["context_mask"].tolist() == [[False] * 5 + [True] * 4, [False] * 9]
    assert batch["word_mask"].sum().item() == 6  # the caption's words are read, not tagged


def test_truncated_and_empty_words_are_counted_and_tagged_o(caplog):
    tagger = untrained_tagger(max_length=8)  # [CLS] + 6 subwords + [SEP]
    tweets = [["Obama", "visited", "Paris"], ["Obama", "\x07", "visited"] + ["Paris"] * 7]
    with caplog.at_level(logging.WARNING, logger="gmner.models.tagger"):
        encoded, stats = tagger.encode(tweets)
    assert (stats.truncated_words, stats.empty_words) == (3, 1)
    assert encoded[1].word_idx == [0, 2, 3, 4, 5, 6] and "3 words beyond max_length=8" in caplog.text
    tags = tagger.predict_tags(tweets)
    assert [len(t) for t in tags] == [3, 10]
    assert tags[1][1] == "O" and tags[1][7:] == ["O"] * 3


def test_unreachable_hub_id_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="no-such-org/no-such-bert"):
        load_text_encoder("no-such-org/no-such-bert", TINY)


def test_unknown_model_kind_is_a_data_error(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"kind": "mystery"}))
    with pytest.raises(DataError, match="model.json.*mystery"):
        predictor.load(tmp_path)


def test_missing_prepared_split_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.parquet"):
        run_stage(params(), tmp_path)


def test_no_weight_decay_on_biases_and_layernorm_and_two_learning_rates():
    tagger = untrained_tagger()
    groups = param_groups(tagger, [tagger.encoder], lr=1e-4, head_lr=1e-2, weight_decay=0.1)
    names = {id(p): n for n, p in tagger.named_parameters()}
    by_group = {(g["name"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in groups}
    assert {g["name"]: g["lr"] for g in groups} == {"encoder": 1e-4, "head": 1e-2}
    no_decay = by_group[("encoder", 0.0)] | by_group[("head", 0.0)]
    assert "encoder.embeddings.LayerNorm.weight" in no_decay and "classifier.bias" in no_decay
    assert "crf.transitions" in by_group[("head", 0.1)] and "classifier.weight" in by_group[("head", 0.1)]
    assert all(n.startswith("encoder.") for n in by_group[("encoder", 0.1)] | by_group[("encoder", 0.0)])
    assert sum(len(g["params"]) for g in groups) == len(list(tagger.parameters()))


def test_checkpoint_folder_is_swapped_in_whole(tmp_path):
    target = tmp_path / "tagger"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tagger"]
    assert sorted(p.name for p in target.iterdir()) == ["b"]
