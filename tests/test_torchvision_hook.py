"""The environment's torchvision imports next to torch (docs/conventions.md, "torchvision"), in a fresh
interpreter."""

import subprocess
import sys

import torch


def test_torchvision_and_its_dependents_import_in_a_fresh_interpreter():
    code = (
        "import torch, torchvision, open_clip, diffusers, transformers, peft\n"
        "from torchvision.transforms import Resize\n"
        "x = Resize(4)(torch.ones(1, 3, 8, 8))\n"
        "print(tuple(x.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 3, 4, 4)"


def test_compiled_ops_fail_with_torchvision_own_message_when_unavailable():
    import torchvision

    if torch.version.cuda is not None:  # a matched CUDA pair: the real ops are there and the hook did nothing
        assert torchvision.ops.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1.0]), 0.5).tolist() == [0]
        return
    try:
        torchvision.ops.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1.0]), 0.5)
    except RuntimeError as error:
        assert "Couldn't load custom C++ ops" in str(error)
    else:
        raise AssertionError("nms ran although torchvision's C++ library cannot load next to CPU torch")
