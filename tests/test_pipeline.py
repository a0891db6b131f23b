"""FTP's layer pipelining: each block is updated as soon as its target exists, with the result of the plain step."""
from __future__ import annotations

import importlib

import pytest
import torch

from ftprop import pipeline
from ftprop.bench import benchmark
from ftprop.models import mlp
from ftprop.rules import make_rule
from ftprop.train import TrainConfig, train
from tests.test_distributed import tiny_data

train_mod = importlib.import_module("ftprop.train")  # `ftprop.train` the attribute is the function


def _params(cfg: TrainConfig) -> list[torch.Tensor]:
    train(cfg, tiny_data())
    return list(torch.load(f"{cfg.out}/checkpoint.pt", weights_only=False)["model"].values())


@pytest.mark.parametrize("kw", [
    {},                                                         # closed-form local gradients (Linear + tanh)
    {"norm": "layernorm", "rule_options": {"update_input": "t"}},  # autograd path, target-path inputs
    {"optimizer": "adam", "weight_decay": 1e-3, "activation": "relu"},
    {"hidden": "16,12,8", "momentum": 0.5, "weight_decay": 1e-3, "schedule": "cosine"},
])
def test_pipelined_training_is_bit_identical(tmp_path, kw):
    """Updating block l inside the step, before the later targets exist, changes nothing: the second pass never
    uses block l again, and the optimizers update each parameter from its own gradient and state."""
    base = {"hidden": "16,8", "epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False, "rule": "ftp", **kw}
    opts = base.pop("rule_options", {})
    plain = _params(TrainConfig(**base, rule_options=opts, out=str(tmp_path / "plain")))
    piped = _params(TrainConfig(**base, rule_options={**opts, "pipeline": True}, out=str(tmp_path / "piped")))
    assert all(torch.equal(a, b) for a, b in zip(plain, piped))


def test_blocks_are_updated_in_target_order_before_the_step_ends():
    """block_ready(l) comes once per block, in order, while the later blocks have no gradient yet."""
    torch.manual_seed(0)
    net = mlp(36, (16, 12, 8), 4)
    rule = make_rule("ftp", pipeline=True)
    opt = torch.optim.SGD(pipeline.param_groups(net), lr=0.1)
    seen = []

    def ready(params):
        seen.append([p.grad is not None for block in net.blocks for p in block.parameters()])

    pipeline.wire(rule, net, opt, ready)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.randn(8, 36), torch.randint(0, 4, (8,))
    rule.step(net, x, y)
    assert seen == [[True] * 2 * (l + 1) + [False] * 2 * (3 - l) for l in range(4)]
    assert not any(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # every block stepped


def test_pipeline_refuses_hardware_hooks(tmp_path):
    cfg = TrainConfig(hidden="16,8", epochs=1, batch_size=32, progress=False, rule="ftp", quant="w8a8",
                      rule_options={"pipeline": True}, out=str(tmp_path))
    with pytest.raises(ValueError, match="pipeline=True does not combine"):
        train(cfg, tiny_data())


def test_benchmark_times_a_pipelined_rule():
    x, y = torch.randn(64, 36), torch.randint(0, 4, (64,))
    res = benchmark({"bp": make_rule("bp"), "ftp": make_rule("ftp"), "ftp-pipelined": make_rule("ftp", pipeline=True)},
                    lambda: mlp(36, (16, 8), 4), x, y, batch_size=16, rounds=1, steps_per_round=2, warmup=1)
    assert res["ftp-pipelined"]["flops_per_sample"] == res["ftp"]["flops_per_sample"]
    assert res["ftp-pipelined"]["step_time_median_s"] > 0


@pytest.mark.parametrize("groups", ["one", "weights-biases", "reversed"])
def test_wire_refuses_an_optimizer_whose_groups_are_not_the_blocks(groups):
    """block_ready(l) steps the optimizer's group number l: with other groups it stepped another block's parameters
    (reversed groups left the head untrained, silently) or raised an IndexError mid-step."""
    net = mlp(36, (16, 8), 4)
    named = list(net.named_parameters())
    made = {"one": [{"params": list(net.parameters())}],
            "weights-biases": [{"params": [p for n, p in named if n.endswith("weight")]},
                               {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}],
            "reversed": pipeline.param_groups(net)[::-1]}[groups]
    rule = make_rule("ftp", pipeline=True)
    with pytest.raises(ValueError, match=r"pipeline: the optimizer .*param_groups\(model\)"):
        pipeline.wire(rule, net, torch.optim.SGD(made, lr=0.1))
