"""The training loop every lstmkit task uses: one model, one loss, batches in, best model out.

    model(*inputs) -> outputs;  loss(outputs, targets) -> scalar tensor
    train_data / val_data: map-style datasets whose items collate into (inputs, targets)
    metric(model, val_batches) -> float: validation score (default: mean validation loss)

Per epoch: shuffle (seeded generator), forward, backward, clip the global gradient norm, step
the optimizer; then validate, step the schedule, track the best validation score (early
stopping restores the best weights), write a checkpoint, update the progress bar.

A checkpoint holds the model, the optimizer's buffers, the schedule, the random states (torch's
global generator for dropout, the shuffling generator) and the counters, so `resume=True`
continues an interrupted run exactly where an uninterrupted one would have been.
"""

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from .config import TrainConfig

Batch = tuple
Metric = Callable[[nn.Module, Iterable[Batch]], float]


# TrainConfig fields a resumed run may change.
_RESUMABLE_ANYWHERE = frozenset({"device", "threads"})


@dataclass(frozen=True)
class TrainResult:
    """What a training run did. `history` has one dict per epoch: epoch, train_loss,
    val_metric (None without validation data), lr, seconds."""

    epochs: int
    best_epoch: int
    best_metric: float | None
    stopped_early: bool
    history: tuple
    device: str


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda"/"cuda:N" must be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; "
                         "use device='cpu' or 'auto'")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed torch's generators (CPU and CUDA): call before building a model for the same
    initial weights every run."""
    torch.manual_seed(seed)


def to_device(value, device: torch.device):
    """Move a tensor, or tensors nested in tuples/lists/dicts, to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _call(model: nn.Module, inputs):
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _batch_size(targets) -> int:
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return targets.shape[0]
    return 1


def mean_loss(loss: Callable) -> Metric:
    """A validation metric: `loss` averaged over all validation samples (lower is better)."""

    @torch.no_grad()
    def metric(model: nn.Module, batches: Iterable[Batch]) -> float:
        total, count = 0.0, 0
        for inputs, targets in batches:
            n = _batch_size(targets)
            total += float(loss(_call(model, inputs), targets)) * n
            count += n
        return total / max(count, 1)

    return metric


def _make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9,
                           weight_decay=config.weight_decay)


def _make_schedule(config: TrainConfig, optimizer):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_epochs)
    if config.schedule == "plateau":
        patience = max(1, (config.patience or 10) // 2)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1,
                                                          patience=patience)
    return None


# -- optimizer state <-> (tensors, JSON) --------------------------------------------------------

def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """torch optimizer state_dict -> (tensors named optimizer.<param>.<key>, JSON rest)."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param}.{key}"] = value
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param, key = name.split(".", 2)
            state.setdefault(int(param), {})[key] = value
    for name, value in meta["scalars"].items():
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {prefix + name: value for name, value in tensors.items()}


def _unprefixed(prefix: str, tensors: dict) -> dict:
    return {name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)}


def _json_roundtrip(value):
    return json.loads(json.dumps(value))


class _Run:
    """The mutable state of one training run; everything a checkpoint must restore."""

    def __init__(self, model, optimizer, schedule, generator):
        self.model, self.optimizer = model, optimizer
        self.schedule, self.generator = schedule, generator
        self.epoch = 0                   # epochs completed
        self.best_epoch = 0
        self.best_metric: float | None = None
        self.best_state: dict | None = None
        self.bad_epochs = 0
        self.history: list[dict] = []
        self.finished = False
        self.stopped_early = False

    def save(self, stem, config: TrainConfig, meta: dict | None) -> None:
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        tensors = {**_prefixed("model.", self.model.state_dict()), **opt_tensors,
                   "rng.torch": torch.get_rng_state(), "rng.shuffle": self.generator.get_state()}
        if self.best_state is not None:
            tensors.update(_prefixed("best.", self.best_state))
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = state
        save_checkpoint(stem, tensors, {
            "format": "lstmkit.train/1",
            "train_config": config.to_dict(),
            "meta": meta,
            "epoch": self.epoch, "best_epoch": self.best_epoch, "best_metric": self.best_metric,
            "bad_epochs": self.bad_epochs, "history": self.history,
            "finished": self.finished, "stopped_early": self.stopped_early,
            "optimizer": opt_meta,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
        })

    def restore(self, stem, config: TrainConfig, meta: dict | None, device) -> None:
        tensors, saved = load_checkpoint(stem)
        if saved.get("format") != "lstmkit.train/1":
            raise ValueError(f"{str(stem)!r} is not an lstmkit training checkpoint")
        for key, value in config.to_dict().items():
            # Where and how fast it runs may change between the halves of a run (an interrupted
            # CPU run resumed on a GPU); what it computes may not.
            if key in _RESUMABLE_ANYWHERE:
                continue
            if saved["train_config"].get(key) != _json_roundtrip(value):
                raise ValueError(f"cannot resume from {str(stem)!r}: it was trained with "
                                 f"{key}={saved['train_config'].get(key)!r}, this run asks for "
                                 f"{key}={value!r}")
        if saved["meta"] != _json_roundtrip(meta):
            raise ValueError(f"cannot resume from {str(stem)!r}: it was written for a different "
                             "task configuration or data (settings or scaling differ)")
        self.model.load_state_dict(_unprefixed("model.", tensors))
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, saved["optimizer"]))
        if self.schedule is not None:
            self.schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.shuffle"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                       if f"rng.cuda.{i}" in tensors]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        best = _unprefixed("best.", tensors)
        self.best_state = {k: v.to(device) for k, v in best.items()} or None
        for key in ("epoch", "best_epoch", "best_metric", "bad_epochs", "history", "finished",
                    "stopped_early"):
            setattr(self, key, saved[key])


def _progress(config: TrainConfig, start: int, quiet: bool):
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=config.max_epochs, initial=start, unit="epoch", disable=disable,
                dynamic_ncols=True, leave=False, desc="training")


def train(model: nn.Module, loss: Callable, train_data: Dataset, config: TrainConfig, *,
          val_data: Dataset | None = None, metric: Metric | None = None,
          higher_is_better: bool = False, collate_fn: Callable | None = None,
          checkpoint: str | Path | None = None, resume: bool = False, meta: dict | None = None,
          quiet: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `model` in place; with validation data, leave it holding its best weights.

    Args:
        model: any nn.Module; called as model(*inputs) (or model(inputs) for one tensor).
        loss: loss(outputs, targets) -> scalar tensor to minimise.
        train_data, val_data: map-style datasets; batches are collated by `collate_fn`
            (torch's default if None) into (inputs, targets).
        config: optimizer, schedule, clipping, early stopping, seed, device.
        metric: validation score metric(model, batches) -> float; default the mean loss.
        higher_is_better: for metrics such as accuracy.
        checkpoint: path stem (no suffix) of the checkpoint written after every epoch:
            STEM.safetensors and STEM.json.
        resume: continue from `checkpoint` if it exists (same config and meta required).
        meta: JSON-serialisable task information saved in the checkpoint (task configuration,
            data scaling, vocabulary); resuming checks it is unchanged.
        quiet: no progress bar (there is none either when stderr is not a terminal).
        on_epoch_end: called as on_epoch_end(epoch, record) after each epoch's checkpoint.
    Returns:
        TrainResult with the per-epoch history.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    if len(train_data) == 0:
        raise ValueError("train_data is empty: there is nothing to train on")
    if val_data is not None and len(val_data) == 0:
        val_data = None
    device = resolve_device(config.device)
    model.to(device)
    metric = metric or mean_loss(loss)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _make_optimizer(config, model.parameters())
    schedule = _make_schedule(config, optimizer)
    run = _Run(model, optimizer, schedule, generator)
    if resume and checkpoint_exists(checkpoint):
        run.restore(checkpoint, config, meta, device)
    loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=config.shuffle,
                        generator=generator, collate_fn=collate_fn)
    val_loader = None if val_data is None else DataLoader(
        val_data, batch_size=max(config.batch_size, 256), shuffle=False, collate_fn=collate_fn)
    sign = -1.0 if higher_is_better else 1.0
    bar = _progress(config, run.epoch, quiet)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        while not run.finished:
            started = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            for inputs, targets in loader:
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                optimizer.zero_grad(set_to_none=True)
                value = loss(_call(model, inputs), targets)
                value.backward()
                if config.clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
                optimizer.step()
                n = _batch_size(targets)
                total += float(value.detach()) * n
                count += n
            train_loss = total / max(count, 1)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training diverged at epoch {run.epoch + 1}: loss is "
                                         f"{train_loss}; try a smaller lr (now {config.lr}) or "
                                         "clip_norm")
            val_metric = None
            if val_loader is not None:
                model.eval()
                val_metric = float(metric(model, (to_device(b, device) for b in val_loader)))
            run.epoch += 1
            score = train_loss if val_metric is None else val_metric
            lr = optimizer.param_groups[0]["lr"]
            if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
                schedule.step(sign * score)
            elif schedule is not None:
                schedule.step()
            if run.best_metric is None or sign * (run.best_metric - score) > config.min_delta:
                run.best_metric, run.best_epoch, run.bad_epochs = score, run.epoch, 0
                if val_loader is not None:
                    run.best_state = copy.deepcopy(model.state_dict())
            else:
                run.bad_epochs += 1
            record = {"epoch": run.epoch, "train_loss": train_loss, "val_metric": val_metric,
                      "lr": lr, "seconds": time.perf_counter() - started}
            run.history.append(record)
            if val_loader is not None and config.patience is not None \
                    and run.bad_epochs >= config.patience:
                run.finished = run.stopped_early = True
            if run.epoch >= config.max_epochs:
                run.finished = True
            if checkpoint is not None:
                run.save(checkpoint, config, meta)
            postfix = {"loss": f"{train_loss:.4g}"}
            if val_metric is not None:
                postfix["val"] = f"{val_metric:.4g}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(run.epoch, record)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.eval()
    return TrainResult(epochs=run.epoch, best_epoch=run.best_epoch, best_metric=run.best_metric,
                       stopped_early=run.stopped_early, history=tuple(run.history),
                       device=str(device))
