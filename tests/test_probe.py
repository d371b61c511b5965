"""Linear probes on frozen features (``memory_peft.probe``): the features are the stock model's own rows, and the
probe is a converged, standardised, weight-decayed linear head chosen on validation."""

import pytest
import torch
from helpers import assert_identical
from test_backbones import BACKBONES, PIXELS, build

from memory_peft.probe import (
    LinearProbe,
    chosen_layers,
    fit_probe,
    flatten,
    layer_features,
    probe_accuracy,
    sweep_probe,
)
from memory_peft.tuner.backbone import describe_backbone
from memory_peft.tuner.errors import InputError


@pytest.mark.parametrize("name", BACKBONES)
def test_layer_features_are_the_stock_models_normed_class_and_mean_patch_tokens(name):
    model = build(name).eval()
    backbone = describe_backbone(model)
    with torch.no_grad():
        states = model(pixel_values=PIXELS, output_hidden_states=True).hidden_states
    skip = 2 if name == "DeiTModel" else 1  # DeiT's distillation token is no patch
    expected = []
    for state in states[1:]:
        normed = backbone.final_norm(state)
        expected.append(torch.stack([normed[:, 0], normed[:, skip:].mean(1)], 1))
    features = layer_features(model, PIXELS, batch_size=2)  # two batches
    assert features.shape == (3, backbone.num_layers, 2, 32)
    assert_identical(features, torch.stack(expected, 1))


def _blobs(n, seed, dims=16, classes=3, noise=1.0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dims, generator=torch.Generator().manual_seed(99)) * 3
    # large, uneven feature scales: what standardisation is for
    scale = torch.logspace(-2, 2, dims)
    return (centres[labels] + noise * torch.randn(n, dims, generator=generator)) * scale + 5, labels


def test_a_probe_converges_on_separable_features_whatever_their_scale():
    x, y = _blobs(384, 0)
    probe = fit_probe(x, y, 3, lr=0.01, weight_decay=1e-4, epochs=30)
    assert probe_accuracy(probe, x, y) == 1.0
    torch.testing.assert_close(probe.mean, x.mean(0))
    torch.testing.assert_close(probe.std, x.std(0))


def test_weight_decay_shrinks_the_probe_and_seeds_change_only_the_order():
    x, y = _blobs(256, 1)
    norms = [fit_probe(x, y, 3, 0.01, wd, epochs=50).linear.weight.norm().item() for wd in (0.0, 10.0)]
    assert norms[1] < 0.5 * norms[0]
    a, b, c = (fit_probe(x, y, 3, 0.01, 0.1, seed, epochs=3).linear.weight for seed in (0, 0, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_the_sweep_chooses_on_validation_over_every_lr_and_weight_decay():
    (x, y), (vx, vy) = _blobs(256, 2, noise=4.0), _blobs(256, 3, noise=4.0)
    swept = sweep_probe((x, y), (vx, vy), 3, lrs=(1e-5, 0.01), weight_decays=(0.0, 0.1), epochs=5)
    assert len(set(swept.scores.values())) > 1
    assert set(swept.scores) == {(1e-5, 0.0), (1e-5, 0.1), (0.01, 0.0), (0.01, 0.1)}
    assert swept.scores[(swept.lr, swept.weight_decay)] == max(swept.scores.values())
    assert probe_accuracy(swept.probe, vx, vy) == swept.scores[(swept.lr, swept.weight_decay)]
    assert swept.lr == 0.01  # 1e-5 for 10 steps from a zero head learns next to nothing


def test_layers_are_named_as_last_all_a_count_or_indices():
    assert chosen_layers(12, "last") == [11]
    assert chosen_layers(12, 4) == [8, 9, 10, 11]
    assert chosen_layers(3, "all") == [0, 1, 2]
    assert chosen_layers(12, [3, 1, 3]) == [1, 3]
    for bad in (0, 13, [12], []):
        with pytest.raises(InputError):
            chosen_layers(12, bad)
    features = torch.arange(2 * 3 * 2 * 4.0).view(2, 3, 2, 4)
    assert flatten(features, [1, 2]).shape == (2, 16)
    assert torch.equal(flatten(features, [2])[0], features[0, 2].flatten())
    assert torch.equal(flatten(features, [2], tokens=(0,)), features[:, 2, 0])


def test_a_probe_refuses_fewer_labels_than_a_batch():
    with pytest.raises(InputError, match="at least one batch"):
        fit_probe(torch.zeros(10, 4), torch.zeros(10, dtype=torch.long), 2, 0.01, 0.0)
    assert isinstance(LinearProbe(torch.zeros(4), torch.zeros(4), 2).std.min().item(), float)
