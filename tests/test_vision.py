"""torchvision models (the optional `vision` extra): convert, train and evaluate; `--model torchvision:NAME`.

Collected only where torchvision is installed (tests/conftest.py); `make test` runs it in .venv-vision.
"""

import json

import pytest
import torch
import torchvision
from torch import nn

import topkconv
from topkconv.attacks import accuracy
from topkconv.layers import TopKConv2d, TopKLinear

TINY_TRAIN = ["--dataset", "digits", "--image-size", "32", "--limit-train", "64", "--limit-test", "16",
              "--no-augment", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def test_resnet18_converted_trains_one_step_and_evaluates():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    converted = topkconv.convert(model, "topk_conv", targets="last:2", k=0.1)
    routed = [(n, m.k) for n, m in converted.named_modules() if isinstance(m, TopKConv2d)]
    assert routed == [("layer4.1.conv1", 52), ("layer4.1.conv2", 52)]  # 10% of 512 channels, rounded up
    assert type(model.layer4[1].conv2) is nn.Conv2d  # the original is untouched
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    before = converted.layer4[1].conv2.weight.detach().clone()
    converted.train()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(converted(x), y)
    loss.backward()
    assert torch.isfinite(loss) and converted.layer4[1].conv2.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(converted.layer4[1].conv2.weight, before)
    acc = accuracy(converted, x, y)
    assert 0.0 <= acc <= 1.0 and converted.training  # evaluated in eval mode, the mode put back


def test_resnet18_at_full_k_computes_the_original():
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.rand(1, 3, 32, 32)
    converted = topkconv.convert(model, "topk_conv", targets="last:3", k=1.0, example_input=example)
    converted = topkconv.convert(converted, "dynamic_k", targets="last:1", k=1.0)
    names = [n for n, m in converted.named_modules() if isinstance(m, (TopKConv2d, TopKLinear))]
    assert names == ["layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2", "fc"]  # forward order
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_torchvision_resnet18_and_reloads_it(tmp_path):
    from topkconv.checkpoint import load_checkpoint
    from topkconv.cli import main

    run = tmp_path / "resnet"
    assert main(["train", *TINY_TRAIN, "--model", "torchvision:resnet18", "--defense", "topk_conv",
                 "--fc-scope", "final", "--fc-k", "0.5", "--conv-k", "0.25", "--out", str(run)]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["spec"]["model"]["arch"] == "torchvision:resnet18"
    assert record["spec"]["model"]["defense"]["kind"] == "topk_conv"
    model, _ = load_checkpoint(run)
    assert [(n, m.k) for n, m in model.named_modules() if isinstance(m, TopKConv2d)] == \
        [("net.layer4.1.conv1", 128), ("net.layer4.1.conv2", 128)]
    assert isinstance(model.net.fc, TopKLinear) and model.net.fc.k == 256
    again, _ = load_checkpoint(run)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)
    assert main(["evaluate", str(run), "--n", "8", "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n_examples"] == 8 and {"fgsm", "pgd"} <= set(result["attacks"])


def test_unknown_torchvision_names_are_errors(tmp_path, capsys):
    from topkconv.cli import main

    assert main(["train", *TINY_TRAIN, "--model", "torchvision:resnet1800", "--out", str(tmp_path / "x")]) == 2
    assert "torchvision has no classifier 'resnet1800'" in capsys.readouterr().err


def test_a_defence_the_architecture_cannot_take_is_named():
    from topkconv.config import ModelConfig, defense_config
    from topkconv.models import build_model

    resnet = ModelConfig(arch="torchvision:resnet18", defense=defense_config("dynamic_k", fc_k=[0.5]))
    with pytest.raises(ValueError, match="fc_scope='final2' routes the last 2 linear layers; the model has 1"):
        build_model(resnet)  # resnet18 has one linear layer: Dynamic-k needs fc_scope="final" there
