"""STSConfig.device: checked at construction, not as a raw torch error once the forecast runs."""

import json

import pytest
import torch

from sts_callback.core.config import STSConfig, device_problem
from sts_callback.core.errors import STSConfigError


@pytest.mark.parametrize("device, named", [
    ("foo", "not a device name"),   # was RuntimeError: Expected one of cpu, cuda, ... when the forecast ran
    ("", "not a device name"),
    ("CPU", "lower case"),
    ("cuda:x", "not a device name"),
    ("meta", "holds no weights"),
    (0, "not int"),                 # `device: 0` in YAML: a name is asked for
])
def test_a_device_torch_cannot_use_is_refused_at_construction(device, named):
    with pytest.raises(STSConfigError, match="STSConfig.device=") as info:
        STSConfig(device=device)
    assert named in str(info.value) and "'cpu'" in str(info.value)
    with pytest.raises(STSConfigError, match=named):
        STSConfig.from_dict({"device": device})


def test_a_backend_this_torch_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(STSConfigError, match="built without CUDA"):  # was AssertionError when the forecast ran
        STSConfig(device="cuda:0")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    with pytest.raises(STSConfigError, match="MPS"):
        STSConfig(device="mps")


def test_good_devices_and_torch_devices_are_kept_as_names(monkeypatch):
    assert STSConfig().device is None and STSConfig(device="cpu").device == "cpu"
    config = STSConfig(device=torch.device("cpu"))
    assert config.device == "cpu" and json.loads(json.dumps(config.to_dict()))["device"] == "cpu"
    assert STSConfig.from_dict(config.to_dict()) == config
    # a CUDA build: the config does not ask the machine for GPUs (that may initialise CUDA); the CLI does
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert STSConfig(device="cuda:1").device == "cuda:1"
    assert "no CUDA GPU is visible" in device_problem("cuda:1", available=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1", available=True) is None
    assert "only 2 CUDA GPU(s)" in device_problem("cuda:2", available=True)
