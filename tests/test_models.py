"""MGN, the UBAT network and their ResNet-50 backbone."""
import pytest
import torch

from reid_ext.models import (
    MGN,
    PRESETS,
    UBATNet,
    build_mgn,
    build_model,
    build_ubat,
    load_backbone_weights,
    resnet50,
)

RESNET50_PARAMETERS = 25_557_032  # torchvision.models.resnet50(), a well-known count


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_mgn_output_shapes(preset):
    torch.manual_seed(0)
    p = PRESETS[preset]
    model = build_mgn(preset).eval()
    images = torch.randn(2, 3, *p.input_size)
    with torch.no_grad():
        out = model(images)
    assert out.embedding.shape == (2, 8 * p.feat_dim) == (2, model.embedding_dim)
    assert len(out.features) == 8 and all(f.shape == (2, p.feat_dim) for f in out.features)
    c5 = round(2048 * p.width)
    assert len(out.global_features) == 3 and all(z.shape == (2, c5) for z in out.global_features)
    assert torch.equal(out.embedding, torch.cat(out.features, dim=1))
    assert all((f >= 0).all() for f in out.features)  # reductions end in ReLU
    # Softmax on the 3 pooled whole-map features and the 5 reduced stripes, triplet on the 3 reduced whole-map ones.
    assert out.id_features == out.global_features + out.features[3:]
    assert out.metric_features == out.features[:3]
    assert model.id_feature_dims == [c5] * 3 + [p.feat_dim] * 5 == [f.size(1) for f in out.id_features]


def test_mgn_pooled_triplet_variant_swaps_the_whole_map_features():
    model = MGN(width=0.0625, feat_dim=8, triplet_on="pooled").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 32))
    assert out.id_features == out.features and out.metric_features == out.global_features
    assert model.id_feature_dims == [8] * 8
    with pytest.raises(ValueError, match="triplet_on must be one of"):
        MGN(width=0.0625, feat_dim=8, triplet_on="stripes")


def test_paper_preset_is_full_size_and_branch_strides():
    assert PRESETS["paper"].feat_dim * 8 == 2048 and PRESETS["paper"].input_size == (384, 128)
    model = MGN()
    # Global branch downsamples in res_conv5_1, part branches do not.
    strides = [branch.conv5[0].conv2.stride for branch in model.branches]
    assert strides == [(2, 2), (1, 1), (1, 1)]
    assert [branch.conv5[0].downsample[0].stride for branch in model.branches] == [(2, 2), (1, 1), (1, 1)]


def test_part_branch_feature_maps_keep_resolution():
    model = MGN(width=0.125, feat_dim=8).eval()
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
    model = MGN(width=0.125, feat_dim=8)
    load_backbone_weights(model, str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.res_conv4_1.conv2.weight, source.layer3[0].conv2.weight)
    for branch in model.branches:
        torch.testing.assert_close(branch.conv4[0].conv1.weight, source.layer3[1].conv1.weight)
        torch.testing.assert_close(branch.conv5[2].bn3.running_mean, source.layer4[2].bn3.running_mean)
        torch.testing.assert_close(branch.conv5[0].downsample[0].weight, source.layer4[0].downsample[0].weight)


def test_load_backbone_rejects_other_widths_and_models():
    model = MGN(width=0.125, feat_dim=8)
    with pytest.raises(ValueError, match="width"):
        model.load_backbone_state_dict(resnet50(width=0.25).state_dict())
    with pytest.raises(ValueError, match="missing"):
        model.load_backbone_state_dict({"conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_ubat_network_is_a_reduced_and_average_pooled_resnet50(preset):
    p = PRESETS[preset]
    model = build_ubat(preset).eval()
    assert isinstance(model, UBATNet) and model.embedding_dim == p.feat_dim
    assert model.id_feature_dims == [p.feat_dim]
    images = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        out = model(images)
        fmap = model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(images))))))))
        expected = model.reduction(fmap).mean(dim=(2, 3))  # 1x1 conv, then global average pooling
    assert out.embedding.shape == (2, p.feat_dim)
    assert out.id_features == out.metric_features == (out.embedding,)
    torch.testing.assert_close(out.embedding, expected, rtol=1e-4, atol=1e-5)
    assert fmap.shape[-2:] == (6, 2)  # last stride 1: conv5 at 1/16 of 96 x 32


def test_ubat_backbone_loads_torchvision_resnet50_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = UBATNet()
    load_backbone_weights(model, str(path))
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    with pytest.raises(ValueError, match="width"):
        UBATNet(width=0.125).load_backbone_state_dict(source.state_dict())


def test_build_model_names_the_choices():
    assert isinstance(build_model("ubat", "cpu"), UBATNet) and isinstance(build_model("mgn", "cpu"), MGN)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("pcb", "cpu")


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        build_mgn("huge")
