"""The forecasting network: lstmkit.LSTM over the lookback window, a linear head to the horizon.

Shape key: B batch, L lookback, C input columns (K targets first, then covariates), Hz horizon.
"""

import torch
from torch import nn

from ...nn import LSTM


class ForecastNet(nn.Module):
    """(B, L, C) scaled inputs -> (B, Hz, K) scaled forecasts, all horizon steps at once.

    With `relative=True` the network sees the targets relative to their last observed value
    and forecasts the change from it: y_hat = y_last + head(LSTM(x - y_last)). A trend then
    does not push inputs outside the range seen in training, and "no change" (the naive
    forecast) is the network's starting point rather than something it must learn.
    """

    def __init__(self, inputs: int, targets: int, horizon: int, hidden_size: int,
                 num_layers: int = 1, dropout: float = 0.0, relative: bool = True,
                 lstm_options: dict | None = None):
        super().__init__()
        self.targets, self.horizon, self.relative = targets, horizon, relative
        self.lstm = LSTM(inputs, hidden_size, num_layers, dropout=dropout, batch_first=True,
                         **(lstm_options or {}))
        features = (self.lstm.proj_size or hidden_size) * self.lstm.num_directions
        self.head = nn.Linear(features, horizon * targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, -1:, :self.targets]                                    # (B, 1, K)
        if self.relative:
            x = torch.cat([x[..., :self.targets] - last, x[..., self.targets:]], dim=-1)
        output, _ = self.lstm(x)                                           # (B, L, D*P)
        y = self.head(output[:, -1]).view(x.shape[0], self.horizon, self.targets)
        return y + last if self.relative else y
