"""The training loop: reproducibility, exact resume, early stopping, checkpoints, config checks."""

import dataclasses
import json

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import lstmkit
from lstmkit.train import (
    TrainConfig,
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    train,
)


class TinyNet(torch.nn.Module):
    """LSTM with dropout between layers (so resuming must restore the dropout RNG) and a head."""

    def __init__(self):
        super().__init__()
        self.lstm = lstmkit.LSTM(2, 5, num_layers=2, dropout=0.3, batch_first=True)
        self.head = torch.nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def make_data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 2, generator=g)
    return TensorDataset(x, x.sum(dim=(1, 2)).unsqueeze(1) * 0.1)


def run(config, checkpoint=None, resume=False, stop_at=None):
    # One thread: tiny models are fastest on one core, and stay fast on a busy machine.
    config = dataclasses.replace(config, threads=1)
    seed_everything(config.seed)
    model = TinyNet()

    def interrupt(epoch, record):
        if epoch == stop_at:
            raise KeyboardInterrupt

    result = train(model, F.mse_loss, make_data(), config, val_data=make_data(16, seed=2),
                   checkpoint=checkpoint, resume=resume, meta={"task": "test"}, quiet=True,
                   on_epoch_end=interrupt if stop_at else None)
    return model, result


def assert_same_weights(model_a, model_b):
    """Bitwise equality of every parameter and buffer."""
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


CONFIG = TrainConfig(max_epochs=6, batch_size=8, lr=1e-2, schedule="cosine", patience=None)


def test_same_seed_same_numbers():
    model_a, result_a = run(CONFIG)
    model_b, result_b = run(CONFIG)
    assert_same_weights(model_a, model_b)
    assert [r["train_loss"] for r in result_a.history] == \
        [r["train_loss"] for r in result_b.history]


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("sgd", "plateau"),
                                                ("adamw", "none")])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, optimizer, schedule):
    config = TrainConfig(max_epochs=6, batch_size=8, lr=1e-2, optimizer=optimizer,
                         schedule=schedule, patience=None)
    reference, reference_result = run(config)
    stem = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(config, checkpoint=stem, stop_at=3)
    assert json.loads(stem.with_suffix(".json").read_text())["epoch"] == 3
    resumed, resumed_result = run(config, checkpoint=stem, resume=True)
    assert_same_weights(reference, resumed)
    assert [r["train_loss"] for r in resumed_result.history] == \
        [r["train_loss"] for r in reference_result.history]
    assert resumed_result.epochs == 6


def test_resume_refuses_a_different_config(tmp_path):
    stem = tmp_path / "ckpt"
    run(TrainConfig(max_epochs=2, batch_size=8), checkpoint=stem)
    with pytest.raises(ValueError, match="lr=0.5"):
        run(TrainConfig(max_epochs=2, batch_size=8, lr=0.5), checkpoint=stem, resume=True)


def test_resume_may_change_device_and_threads(tmp_path):
    stem = tmp_path / "ckpt"
    config = TrainConfig(max_epochs=3, batch_size=8, threads=2)
    reference, _ = run(config)
    with pytest.raises(KeyboardInterrupt):
        run(config, checkpoint=stem, stop_at=2)
    resumed, result = run(TrainConfig(max_epochs=3, batch_size=8, threads=1, device="cpu"),
                          checkpoint=stem, resume=True)
    assert result.epochs == 3
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)             # another thread count may round otherwise


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    model, result = run(CONFIG, checkpoint=tmp_path / "none", resume=True)
    reference, _ = run(CONFIG)
    assert_same_weights(model, reference)
    assert checkpoint_exists(tmp_path / "none")


def test_early_stopping_restores_best_weights():
    # A learning rate this large makes the validation loss worse after the first epochs.
    config = TrainConfig(max_epochs=50, batch_size=8, lr=0.5, patience=2, schedule="none")
    model, result = run(config)
    assert result.stopped_early and result.epochs < 50
    assert result.epochs == result.best_epoch + 2
    best = min(r["val_metric"] for r in result.history)
    assert result.best_metric == best
    with torch.no_grad():
        x, y = make_data(16, seed=2).tensors
        assert F.mse_loss(model.eval()(x), y).item() == pytest.approx(best, rel=1e-6)


def test_loss_decreases_on_a_learnable_problem():
    config = TrainConfig(max_epochs=15, batch_size=8, lr=2e-2, patience=None)
    _, result = run(config)
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]


def test_checkpoint_roundtrip_and_mismatch_detection(tmp_path):
    stem = tmp_path / "c"
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7.0)}
    save_checkpoint(stem, tensors, {"scaling": {"mean": [1.5]}, "vocabulary": ["a", "b"]})
    loaded, meta = load_checkpoint(stem)
    assert torch.equal(loaded["w"], tensors["w"]) and meta["vocabulary"] == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp"))                  # no temporary files left behind
    probe = tmp_path / "probe"
    probe.write_text("")                                     # what open() gives a new file
    assert (tmp_path / "c.json").stat().st_mode == probe.stat().st_mode
    # A JSON file from another save does not pair with these tensors.
    other = tmp_path / "d"
    save_checkpoint(other, tensors, {})
    (tmp_path / "c.json").write_text((tmp_path / "d.json").read_text())
    with pytest.raises(ValueError, match="different saves"):
        load_checkpoint(stem)


def test_checkpoint_files_hold_no_pickle(tmp_path):
    stem = tmp_path / "ckpt"
    run(TrainConfig(max_epochs=1, batch_size=8), checkpoint=stem)
    blob = (tmp_path / "ckpt.safetensors").read_bytes()
    header_size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_size])             # safetensors: JSON header + raw data
    assert "rng.torch" in header and any(k.startswith("optimizer.") for k in header)
    assert b"\x80\x04\x95" not in blob[:8 + header_size]     # no pickle protocol-4 frames


@pytest.mark.parametrize("field,value,message", [
    ("max_epochs", 0, "max_epochs must be an int >= 1, got 0"),
    ("lr", -1.0, "lr must be > 0, got -1.0"),
    ("optimizer", "adagrad", "optimizer must be one of"),
    ("schedule", "step", "schedule must be one of"),
    ("device", "tpu", "device must be"),
    ("clip_norm", 0.0, "clip_norm must be > 0"),
    ("patience", 0, "patience must be an int >= 1"),
    ("threads", 0, "threads must be an int >= 1, got 0"),
])
def test_config_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_threads_apply_during_training_only():
    before = torch.get_num_threads()
    seen = []
    train(TinyNet(), F.mse_loss, make_data(), TrainConfig(max_epochs=1, threads=1), quiet=True,
          on_epoch_end=lambda epoch, record: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before


def test_config_types_and_cuda_request():
    with pytest.raises(TypeError, match="batch_size must be an int"):
        TrainConfig(batch_size=2.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            run(TrainConfig(max_epochs=1, device="cuda"))
