"""Device placement in the training and dataset paths, checked without a GPU: on PyTorch's "meta" device every
tensor op runs for its shapes and devices only, so a tensor left on the CPU beside device tensors fails here as it
would on CUDA."""
import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import bigr_engine as be
from bigr_engine.train import codes_dataset
from bigr_engine.train.bigr import masked_modeling_loss


class MixedDevices(TorchFunctionMode):
    """Records every torch call whose tensor arguments sit on more than one device (0-dim CPU scalars aside, as
    PyTorch itself allows those)."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        leaves, _ = tree_flatten((args, kwargs or {}))
        devices = {x.device.type for x in leaves if isinstance(x, torch.Tensor) and not (x.dim() == 0 and x.device.type == "cpu")}
        if len(devices) > 1:
            self.mixed.append(f"{getattr(func, '__name__', func)} on {sorted(devices)}")
        return func(*args, **(kwargs or {}))


def test_masked_modeling_loss_keeps_everything_on_the_model_device(monkeypatch):
    import torch.fx.experimental._config as fx_config
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)   # boolean indexing has no meta shape
    torch.manual_seed(0)
    cfg = be.BiGRConfig(dim=64, n_layer=1, n_head=1, bits=6, num_tokens=9, num_classes=3, transcoder_blocks=1,
                        transcoder_dim=16, train_steps=16)
    model = be.BiGR(cfg).to("meta")
    codes = torch.zeros(4, 9, 6, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    with MixedDevices() as mode:
        loss = masked_modeling_loss(model, codes, labels, torch.arange(4, device="meta"), seed=0, step=3, repeat=2)
    assert not mode.mixed, mode.mixed
    assert loss.device.type == "meta" and loss.shape == (4,)


class TokenizerOnAnotherDevice(torch.nn.Module):
    """A stand-in B-AE whose weights live on "meta": encode insists on getting its input there."""
    bits = 6

    class cfg:
        num_tokens, img_size = 4, 8

        @staticmethod
        def to_dict():
            return {"stub": True}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.seen = []

    def encode(self, x, deterministic=True):
        self.seen.append(x.device.type)
        assert x.device == self.w.device, f"images on {x.device}, tokenizer on {self.w.device}"
        return torch.ones(x.shape[0], 4, 6, dtype=torch.uint8)   # codes back on the host, as a GPU's are after .cpu()


def test_encode_dataset_moves_images_to_the_tokenizer(tmp_path):
    bae = TokenizerOnAnotherDevice()
    images = torch.rand(5, 3, 8, 8)
    codes_dataset.encode_dataset(bae, images, np.arange(5), tmp_path, shard_size=3, batch_size=2, progress=False)
    assert bae.seen == ["meta"] * 3
    data = codes_dataset.CodesDataset(tmp_path)
    assert data[torch.tensor([4])].shape == (1, 4, 6)
