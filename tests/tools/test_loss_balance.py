"""tools/loss_balance.py: loss terms grouped over their per-layer copies, values and gradient norms."""

import pytest
import torch
from torch import nn

from _scripts import load_script

loss_balance = load_script("tools/loss_balance.py")


class _Toy(nn.Module):
    """loss_a (final + one aux copy) on the decoder's weight, loss_b on another parameter."""

    def __init__(self):
        super().__init__()
        self.transformer_decoder = nn.Linear(2, 2, bias=False)
        self.other = nn.Parameter(torch.tensor([1.0, -2.0]))
        nn.init.constant_(self.transformer_decoder.weight, 0.5)

    def forward(self, batch):
        w = self.transformer_decoder.weight
        return {"loss_a": w.sum() * batch, "loss_a_0": 2 * w.sum() * batch, "loss_b": (self.other ** 2).sum()}


def test_groups_values_and_gradient_norms_by_hand():
    assert loss_balance.group_of("loss_vcp_ce_2") == "loss_vcp_ce" and loss_balance.group_of("loss_ce") == "loss_ce"
    res = loss_balance.measure(_Toy(), [1.0, 3.0])
    # loss_a group = 3 * sum(w) * batch: value 3 * 2 * batch (mean 6), d/dw = 3 * batch per entry -> norm 3 * batch * 2
    assert res["loss_a"]["value"] == pytest.approx((6.0 + 18.0) / 2)
    assert res["loss_a"]["grad_all"] == pytest.approx((6.0 + 18.0) / 2)
    assert res["loss_a"]["grad_decoder"] == pytest.approx(res["loss_a"]["grad_all"])
    # loss_b = |other|^2 = 5, gradient 2 * other -> norm 2 * sqrt(5); none on the decoder
    assert res["loss_b"]["value"] == pytest.approx(5.0)
    assert res["loss_b"]["grad_all"] == pytest.approx(2 * 5 ** 0.5)
    assert res["loss_b"]["grad_decoder"] == 0.0
