"""Ensembles of fold models: the output is the mean of the members' softmax."""
import torch

from pixelseg.loading import Ensemble
from pixelseg.models import create_model


def test_ensemble_is_mean_of_member_softmax():
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None).eval())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = Ensemble(members).eval()(x)
        each = [m(x).softmax(1) for m in members]
    mean = sum(each) / 3
    assert torch.allclose(out.softmax(1), mean, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 32, 32), atol=1e-5)
    # not simply one member, nor the softmax of the mean logits
    assert not torch.allclose(mean, each[0], atol=1e-4)
