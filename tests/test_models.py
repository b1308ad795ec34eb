"""MGN, its ResNet-50 backbone and the loss recipes."""
import pytest
import torch

from reid_ext.models import MGN, PRESETS, build_mgn, build_recipe, load_backbone_weights, resnet50

RESNET50_PARAMETERS = 25_557_032  # torchvision.models.resnet50(), a well-known count


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_mgn_output_shapes(preset):
    torch.manual_seed(0)
    p = PRESETS[preset]
    model = build_mgn(preset, num_classes=7).eval()
    images = torch.randn(2, 3, *p.input_size)
    with torch.no_grad():
        out = model(images)
    assert out.embedding.shape == (2, 8 * p.feat_dim) == (2, model.embedding_dim)
    assert len(out.features) == 8 and all(f.shape == (2, p.feat_dim) for f in out.features)
    c5 = round(2048 * p.width)
    assert len(out.global_features) == 3 and all(z.shape == (2, c5) for z in out.global_features)
    assert torch.equal(out.embedding, torch.cat(out.features, dim=1))
    assert all((f >= 0).all() for f in out.features)  # reductions end in ReLU
    assert len(model.classifiers) == 8 and all(c.weight.shape == (7, p.feat_dim) for c in model.classifiers)


def test_paper_preset_is_full_size_and_branch_strides():
    assert PRESETS["paper"].feat_dim * 8 == 2048 and PRESETS["paper"].input_size == (384, 128)
    model = MGN(num_classes=0)
    assert len(model.classifiers) == 0
    # Global branch downsamples in res_conv5_1, part branches do not.
    strides = [branch.conv5[0].conv2.stride for branch in model.branches]
    assert strides == [(2, 2), (1, 1), (1, 1)]
    assert [branch.conv5[0].downsample[0].stride for branch in model.branches] == [(2, 2), (1, 1), (1, 1)]


def test_part_branch_feature_maps_keep_resolution():
    model = MGN(num_classes=0, width=0.125, feat_dim=8).eval()
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:]))) for b in model.branches]
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 32))
    for h in hooks:
        h.remove()
    assert sizes == [(3, 1), (6, 2), (6, 2)]  # 96 x 32 input: conv4 is 6 x 2


def test_resnet50_parameter_count_and_names():
    model = resnet50()
    assert sum(p.numel() for p in model.parameters()) == RESNET50_PARAMETERS
    keys = model.state_dict().keys()
    assert "layer4.2.bn3.running_var" in keys and "layer1.0.downsample.1.weight" in keys and "fc.bias" in keys


def test_backbone_state_dict_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet50()
    ours = resnet50()
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(ref_sd[k].shape == our_sd[k].shape for k in ref_sd)


def test_same_weights_give_same_output_as_torchvision():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    # Non-trivial batch-norm statistics, so that they take part in the comparison.
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours = resnet50().eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-4, atol=1e-4)


def test_load_backbone_weights_fills_every_branch(tmp_path):
    torch.manual_seed(0)
    source = resnet50(width=0.125)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = MGN(num_classes=3, width=0.125, feat_dim=8)
    load_backbone_weights(model, str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.res_conv4_1.conv2.weight, source.layer3[0].conv2.weight)
    for branch in model.branches:
        torch.testing.assert_close(branch.conv4[0].conv1.weight, source.layer3[1].conv1.weight)
        torch.testing.assert_close(branch.conv5[2].bn3.running_mean, source.layer4[2].bn3.running_mean)
        torch.testing.assert_close(branch.conv5[0].downsample[0].weight, source.layer4[0].downsample[0].weight)


def test_load_backbone_rejects_other_widths_and_models():
    model = MGN(num_classes=3, width=0.125, feat_dim=8)
    with pytest.raises(ValueError, match="width"):
        model.load_backbone_state_dict(resnet50(width=0.25).state_dict())
    with pytest.raises(ValueError, match="missing"):
        model.load_backbone_state_dict({"conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize("recipe", ["mgn", "ubat"])
def test_recipes_give_finite_losses_and_gradients(recipe):
    torch.manual_seed(0)
    model = MGN(num_classes=4, width=0.0625, feat_dim=8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    modalities = torch.tensor([0, 1] * 4)
    out = model(torch.randn(8, 3, 96, 32))
    criterion = build_recipe(recipe)
    loss, parts = criterion(out, [c.weight for c in model.classifiers], labels, modalities)
    assert torch.isfinite(loss) and loss.dim() == 0
    expected = {"id", "triplet"} | ({"hetero_center"} if recipe == "ubat" else set())
    assert set(parts) == expected
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_recipe_and_preset():
    with pytest.raises(ValueError, match="recipe"):
        build_recipe("arcface")
    with pytest.raises(ValueError, match="preset"):
        build_mgn("huge", 10)
