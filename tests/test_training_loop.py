"""The one training loop as a GPU job: batch order (length grouping, shards), gradient accumulation, bf16,
loader workers, early stopping, per-epoch checkpoints and resuming, and 2-process data-parallel training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from gmner.training import resume
from gmner.training.batching import epoch_batches, length_grouped_batches, padding_fraction, shard
from gmner.training.loop import DevEval, Progress, fit
from gmner.training.tagger import TrainingSet

from helpers import REPO, TINY_TRAIN, seeded_tagger, synthetic_tweets, write_splits

TRAIN = synthetic_tweets(24, 1, "train")  # 5 to 9 words: lengths vary
# Without dropout (the tiny encoder's included), so that runs of different batch shapes can agree.
CFG = {**TINY_TRAIN, "epochs": 3, "batch_size": 4,
       "tiny": {**TINY_TRAIN["tiny"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained(cfg: dict | None = None, **fit_options):
    model = seeded_tagger(TRAIN, train=CFG)
    result = fit(model, TrainingSet(model, TRAIN), {**CFG, **(cfg or {})}, seed=3, **fit_options)
    return model, result


class Recording(TrainingSet):
    """A training set that records the indices of every batch it collates, epoch by epoch."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: list[tuple[int, tuple[int, ...]]] = []
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch(self, indices):
        self.seen.append((self.epoch, tuple(indices)))
        return super().batch(indices)


# --- batch order --------------------------------------------------------------------------------------------


def test_plain_batches_are_the_seeded_permutation_split():
    batches = epoch_batches(10, 4, torch.Generator().manual_seed(5))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5)).split(4)
    assert batches == [b.tolist() for b in expected]


def test_length_grouping_covers_every_sentence_once_longest_first_and_pads_less():
    lengths = [int(x) for x in torch.randint(5, 120, (400,), generator=torch.Generator().manual_seed(0))]
    grouped = length_grouped_batches(lengths, 16, 5, torch.Generator().manual_seed(1))
    plain = epoch_batches(400, 16, torch.Generator().manual_seed(1))
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    assert padding_fraction(lengths, grouped) < padding_fraction(lengths, plain) / 3
    assert grouped == length_grouped_batches(lengths, 16, 5, torch.Generator().manual_seed(1))
    assert grouped != length_grouped_batches(lengths, 16, 5, torch.Generator().manual_seed(2))


def test_padding_fraction_counts_padded_positions():
    assert padding_fraction([2, 4, 4], [[0, 1], [2]]) == pytest.approx(1 - 10 / 12)


def test_shards_split_each_global_batch_and_pad_the_last():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    zero, one = shard(batches, 0, 2), shard(batches, 1, 2)
    assert zero == [[0, 1], [4, 5], [8]] and one == [[2, 3], [6, 7], [0]]
    assert shard(batches, 0, 1) is batches
    assert shard([[0]], 2, 3) == [[0]]  # fewer sentences than processes: repeated


# --- what a run computes ------------------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_big_batch():
    big, _ = trained({"batch_size": 8})
    accumulated, _ = trained({"batch_size": 4, "grad_accum": 2})
    for name, value in weights(big).items():
        torch.testing.assert_close(weights(accumulated)[name], value, rtol=1e-4, atol=1e-5)


def test_bf16_on_cpu_trains():
    model, result = trained({"precision": "bf16", "epochs": 2})
    start = weights(seeded_tagger(TRAIN, train=CFG))
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in result.history)
    assert any(not torch.equal(start[k], v) for k, v in weights(model).items())
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


def test_loader_workers_give_the_same_weights():
    in_thread, _ = trained({"group_by_length": True})
    workers, _ = trained({"group_by_length": True, "loader_workers": 2})
    for name, value in weights(in_thread).items():
        assert torch.equal(weights(workers)[name], value), name


def test_patience_stops_and_keeps_the_best_epoch():
    figures = iter([0.5, 0.6, 0.55, 0.58, 0.9])
    _, result = trained({"epochs": 5, "patience": 2}, dev=DevEval(lambda: {"f1": next(figures)}, select="f1"))
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2 and result.best_dev == 0.6 and result.stopped_early


# --- checkpoints and resuming -------------------------------------------------------------------------------


class Killed(Exception):
    pass


FIGURES = [0.2, 0.5, 0.4, 0.45]  # dev F1 by epoch: epoch 2 is the best


def dev_until(data: Recording, kill_at: int | None) -> DevEval:
    """The epoch's dev figure, raising ``Killed`` at epoch ``kill_at`` (before its checkpoint is written)."""

    def compute():
        if data.epoch == kill_at:
            raise Killed
        return {"f1": FIGURES[data.epoch - 1]}

    return DevEval(compute, select="f1")


def recorded_run(run_dir, kill_at=None, cfg=None, model=None):
    model = model or seeded_tagger(TRAIN)  # with the encoder's dropout: random draws to resume
    data = Recording(model, TRAIN)
    config = {**CFG, "epochs": 4, "group_by_length": True, **(cfg or {})}
    try:
        result = fit(model, data, config, seed=3, dev=dev_until(data, kill_at), run_dir=run_dir)
    except Killed:
        return model, data.seen, None
    return model, data.seen, result


def test_a_killed_run_resumes_byte_identical_without_repeating_or_skipping_a_batch(tmp_path):
    whole, whole_batches, whole_result = recorded_run(None)
    _, before, _ = recorded_run(tmp_path / "run", kill_at=3, cfg={"keep_last": 0})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch-0002.pt"]
    resumed, after, result = recorded_run(tmp_path / "run", cfg={"keep_last": 0})
    assert [e for e, _ in after] == [3] * 6 + [4] * 6  # epochs 1 and 2 came from the checkpoint
    epoch_three_then_four = [b for b in whole_batches if b[0] >= 3]
    assert before[: 12] == whole_batches[: 12] and after == epoch_three_then_four
    for name, value in weights(whole).items():
        assert torch.equal(weights(resumed)[name], value), name
    assert result.best_epoch == whole_result.best_epoch == 2
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in result.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in whole_result.history]
    assert not (tmp_path / "run").exists()  # keep_last 0: a finished run leaves no checkpoint


def test_keep_last_keeps_the_newest_checkpoints_and_a_finished_run_resumes_to_its_end(tmp_path):
    first, _, _ = recorded_run(tmp_path / "run", cfg={"keep_last": 2})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch-0003.pt", "epoch-0004.pt"]
    again, batches, result = recorded_run(tmp_path / "run", cfg={"keep_last": 2})
    assert batches == [] and result.best_epoch == 2  # nothing left to train
    for name, value in weights(first).items():
        assert torch.equal(weights(again)[name], value)


def test_a_checkpoint_of_other_starting_weights_is_not_resumed(tmp_path, caplog):
    recorded_run(tmp_path / "run", kill_at=3)
    model = seeded_tagger(TRAIN)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # another start, same run folder
    _, batches, _ = recorded_run(tmp_path / "run", model=model)
    assert {e for e, _ in batches} == {1, 2, 3, 4}
    assert "other starting weights" in caplog.text


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog):
    recorded_run(tmp_path / "run", kill_at=4, cfg={"keep_last": 2})
    (tmp_path / "run" / "epoch-0003.pt").write_bytes(b"truncated")
    _, batches, _ = recorded_run(tmp_path / "run", cfg={"keep_last": 2})
    assert {e for e, _ in batches} == {3, 4}
    assert "unreadable checkpoint" in caplog.text


def test_checkpoints_load_without_unpickling_code(tmp_path):
    recorded_run(tmp_path / "run", kill_at=2)
    checkpoint = torch.load(tmp_path / "run" / "epoch-0001.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and set(checkpoint["rng"][0]) >= {"torch", "numpy", "python"}


def test_run_folders_are_keyed_by_params_and_input_bytes(tmp_path):
    data = tmp_path / "data" / "prepared"
    data.mkdir(parents=True)
    (data / "train.parquet").write_bytes(b"one")
    params = {"base": {"cache_root": ".cache"}, "train": {"lr": 0.1}}
    key = resume.run_folder(tmp_path, params, "train", [data / "train.parquet"])
    assert key.parent == tmp_path / ".cache" / "runs" and key.name.startswith("train-")
    assert resume.run_folder(tmp_path, params, "train", [data / "train.parquet"]) == key
    assert resume.run_folder(tmp_path, params, "train", [data / "train.parquet"], processes=2) != key
    assert resume.run_folder(tmp_path, {**params, "train": {"lr": 0.2}}, "train", [data / "train.parquet"]) != key
    (data / "train.parquet").write_bytes(b"two")
    assert resume.run_folder(tmp_path, params, "train", [data / "train.parquet"]) != key


# --- data-parallel ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from gmner.training.loop import start_run

    torch.set_num_threads(1)
    start_run(0, "cpu")
    model, result = trained({"batch_size": 4})
    if rank == 0:
        torch.save({"weights": weights(model), "history": result.history}, out)


@pytest.mark.slow
def test_two_gloo_processes_train_as_one_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.start_processes(_process, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    single, result = trained({"batch_size": 8})
    ddp = torch.load(out, weights_only=True)
    for name, value in weights(single).items():
        torch.testing.assert_close(ddp["weights"][name], value, rtol=1e-4, atol=1e-5)
    for one, two in zip(result.history, ddp["history"]):
        assert one["train/loss"] == pytest.approx(two["train/loss"], rel=1e-4)


# --- a stage killed with SIGKILL ----------------------------------------------------------------------------


def _stage_root(root, epochs: int):
    write_splits(root, {"train": synthetic_tweets(160, 1, "train"), "dev": synthetic_tweets(24, 2, "dev")})
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(epochs=epochs, keep_last=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _train(root) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gmner.cli", "train"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_stage_killed_by_sigkill_resumes_to_the_same_model(tmp_path):
    whole = _stage_root(tmp_path / "whole", epochs=8)
    assert _train(whole).wait() == 0
    killed = _stage_root(tmp_path / "killed", epochs=8)
    process = _train(killed)
    runs = killed / ".cache" / "runs"
    while not list(runs.glob("*/epoch-0003.pt")) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "models" / "tagger").exists()
    assert _train(killed).wait() == 0
    for name in ("head.safetensors", "encoder/model.safetensors", "model.json"):
        assert (killed / "models/tagger" / name).read_bytes() == (whole / "models/tagger" / name).read_bytes()
    summaries = [json.loads((root / "models/tagger/train_summary.json").read_text()) for root in (whole, killed)]
    assert [len(s["history"]) for s in summaries] == [8, 8]
    assert summaries[0]["best_epoch"] == summaries[1]["best_epoch"]
    assert not list(runs.iterdir())  # keep_last 0: the finished run's checkpoints are gone


def test_progress_outside_a_terminal_is_log_lines_with_rate_and_time_left(monkeypatch, caplog):
    monkeypatch.setattr(Progress, "LOG_EVERY_S", 0.0)
    caplog.set_level("INFO", logger="gmner.training.loop")
    progress = Progress("epoch 1/2", 3, processes=2, show=True)  # pytest's stderr is no terminal
    for done in (1, 2, 3):
        progress.update(sentences=4 * done, loss=1.5)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["epoch 1/2: 1/3 batches", "epoch 1/2: 2/3 batches"]
    assert all("loss 1.5000" in line and "sentences/s" in line and "s left" in line for line in lines)
    quiet = Progress("epoch 1/2", 3, processes=1, show=False)  # not the main process
    quiet.update(sentences=4, loss=1.0)
    assert len(caplog.records) == 2
