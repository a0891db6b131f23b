"""CUDA: every rule, model kind, quantizer and device model trains on the GPU without a host round-trip in the step.

Run on a machine with a GPU: `pytest -m gpu`. Without CUDA every test here is skipped.
`torch.cuda.set_sync_debug_mode("error")` turns any synchronising call (a .item(), a bool() of a tensor, a blocking
copy) inside the step into an error; the first step runs outside it, because rules create their fixed matrices and
generators there (a host-to-device copy, once).
"""
from __future__ import annotations

import pytest
import torch

from ftprop.hardware import attach
from ftprop.models import build_model
from ftprop.pipeline import enabled, param_groups, wire
from ftprop.rules import RULES, make_rule
from ftprop.train import TrainConfig, train
from tests.test_distributed import tiny_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MLP_ONLY = {"dtp", "ff"}
MODELS = {"mlp": {}, "cnn": {"spec": "c4k3-relu-p2-f-l16-tanh-l4"}}
HARDWARE = {"float": {}, "quant": {"quant": "w8a8e8u8", "rounding": "stochastic"}, "analog": {"analog": "reram"}}


@pytest.mark.parametrize("hardware", HARDWARE)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rule", [*RULES, "ftp-pipelined"])
def test_step_has_no_host_sync(rule, model, hardware):
    if model == "cnn" and rule in MLP_ONLY:
        pytest.skip(f"{rule} is defined for MLPs only")
    if rule == "ftp-pipelined" and hardware != "float":
        pytest.skip("pipelining does not combine with hardware hooks")
    device = torch.device("cuda")
    torch.manual_seed(0)
    net = build_model("spec" if model == "cnn" else "mlp", (1, 6, 6), 4, "16,8", spec=MODELS[model].get("spec"))
    net = net.to(device)
    r = make_rule("ftp", pipeline=True) if rule == "ftp-pipelined" else make_rule(rule)
    opt = torch.optim.SGD(param_groups(net) if enabled(r) else net.parameters(), lr=0.01, momentum=0.9)
    attach(net, opt, seed=0, **HARDWARE[hardware])
    if enabled(r):
        wire(r, net, opt)
    data = tiny_data().to(device)
    x, y = data.x_train[:32], data.y_train[:32]

    def step() -> torch.Tensor:
        out = r.step(net, x, y)
        if not enabled(r):
            opt.step()
        return out.loss

    step()  # creates the rule's matrices and generators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("rule", ["bp", "ftp"])
def test_train_on_cuda_matches_cpu(tmp_path, rule):
    """The training loop on --device cuda learns the same run as on CPU, up to the GPU's float rounding."""
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(hidden="16,8", epochs=2, batch_size=32, lr=0.05, progress=False, rule=rule, device=device,
                          out=str(tmp_path / device))
        train(cfg, tiny_data().to(device))
        runs[device] = torch.load(tmp_path / device / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    for name, p in runs["cpu"].items():
        torch.testing.assert_close(runs["cuda"][name], p, rtol=1e-4, atol=1e-5)
