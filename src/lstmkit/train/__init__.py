"""One training loop for every lstmkit task: `train(model, loss, data, TrainConfig(...))`.

    >>> import torch, lstmkit
    >>> from lstmkit.train import TrainConfig, train
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 5, 3), torch.randn(64, 1))
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lstm, self.head = lstmkit.LSTM(3, 8, batch_first=True), torch.nn.Linear(8, 1)
    ...     def forward(self, x):
    ...         return self.head(self.lstm(x)[0][:, -1])
    >>> result = train(Net(), torch.nn.functional.mse_loss, data, TrainConfig(max_epochs=2),
    ...                quiet=True)
    >>> result.epochs
    2
"""

from .checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
)
from .config import OPTIMIZERS, SCHEDULES, TrainConfig
from .loop import TrainResult, mean_loss, resolve_device, seed_everything, to_device, train

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "TrainConfig", "TrainResult", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "checkpoint_exists", "load_checkpoint",
    "mean_loss", "resolve_device", "save_checkpoint", "seed_everything", "to_device", "train",
]
