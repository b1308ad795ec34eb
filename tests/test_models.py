"""MGN, the UBAT network, their ResNet-50 backbone and the loss recipes."""
import pytest
import torch

import reid_ext
from reid_ext.models import (
    MGN,
    PRESETS,
    UBATNet,
    build_mgn,
    build_model,
    build_recipe,
    build_ubat,
    load_backbone_weights,
    resnet50,
)

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
    # Softmax on the 3 pooled whole-map features and the 5 reduced stripes, triplet on the 3 reduced whole-map ones.
    assert out.id_features == out.global_features + out.features[3:]
    assert out.metric_features == out.features[:3]
    assert [tuple(c.weight.shape) for c in model.classifiers] == [(7, c5)] * 3 + [(7, p.feat_dim)] * 5


def test_mgn_pooled_triplet_variant_swaps_the_whole_map_features():
    model = MGN(num_classes=5, width=0.0625, feat_dim=8, triplet_on="pooled").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 32))
    assert out.id_features == out.features and out.metric_features == out.global_features
    assert all(c.weight.shape == (5, 8) for c in model.classifiers)
    with pytest.raises(ValueError, match="triplet_on must be one of"):
        MGN(num_classes=5, width=0.0625, feat_dim=8, triplet_on="stripes")


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


def _tiny_model(name):
    torch.manual_seed(0)
    if name == "mgn":
        return MGN(num_classes=4, width=0.0625, feat_dim=8)
    return UBATNet(num_classes=4, width=0.0625, feat_dim=8)


@pytest.mark.parametrize("model_name", ["mgn", "ubat"])
@pytest.mark.parametrize("recipe", ["mgn", "ubat"])
def test_recipes_give_finite_losses_and_gradients(model_name, recipe):
    model = _tiny_model(model_name)
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


def test_mgn_recipe_places_softmax_on_pooled_and_stripes_and_triplet_on_reduced_globals():
    model = _tiny_model("mgn")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model(torch.randn(8, 3, 96, 32))
    weights = [c.weight for c in model.classifiers]
    loss, parts = build_recipe("mgn")(out, weights, labels)
    ce = [torch.nn.functional.cross_entropy(f @ w.t(), labels)
          for f, w in zip(out.global_features + out.features[3:], weights)]
    tri = [reid_ext.reference.batch_hard_triplet_loss(r, labels, margin=1.2) for r in out.features[:3]]
    torch.testing.assert_close(parts["id"], torch.stack(ce).mean())
    torch.testing.assert_close(parts["triplet"], torch.stack(tri).mean())
    torch.testing.assert_close(loss, torch.stack(ce).mean() + torch.stack(tri).mean())


def test_ubat_recipe_on_the_ubat_network_takes_its_one_embedding():
    model = _tiny_model("ubat")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    modalities = torch.tensor([0, 1] * 4)
    out = model(torch.randn(8, 3, 96, 32))
    (weight,) = [c.weight for c in model.classifiers]
    loss, parts = build_recipe("ubat")(out, [weight], labels, modalities)
    emb = out.embedding
    cos = reid_ext.reference.cosine_softmax_loss(emb, weight, labels, scale=16.0, margin=0.2)
    tri = reid_ext.reference.unified_triplet_loss(emb, labels)
    hc = reid_ext.reference.hetero_center_triplet_loss(emb, labels, modalities)
    torch.testing.assert_close(parts["id"], cos)
    torch.testing.assert_close(parts["triplet"], tri)
    torch.testing.assert_close(parts["hetero_center"], hc)
    torch.testing.assert_close(loss, cos + tri + hc)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_ubat_network_is_a_reduced_and_average_pooled_resnet50(preset):
    p = PRESETS[preset]
    model = build_ubat(preset, num_classes=7).eval()
    assert isinstance(model, UBATNet) and model.embedding_dim == p.feat_dim
    assert [tuple(c.weight.shape) for c in model.classifiers] == [(7, p.feat_dim)]
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
    model = UBATNet(num_classes=3)
    load_backbone_weights(model, str(path))
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    with pytest.raises(ValueError, match="width"):
        UBATNet(num_classes=3, width=0.125).load_backbone_state_dict(source.state_dict())


def test_build_model_names_the_choices():
    assert isinstance(build_model("ubat", "cpu", 5), UBATNet) and isinstance(build_model("mgn", "cpu", 5), MGN)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("pcb", "cpu", 5)


def test_unknown_recipe_and_preset():
    with pytest.raises(ValueError, match="recipe"):
        build_recipe("arcface")
    with pytest.raises(ValueError, match="preset"):
        build_mgn("huge", 10)


def test_ubat_is_credited_to_its_authors():
    from reid_ext.models import recipes, ubat

    for doc in (recipes.__doc__, ubat.__doc__):
        assert "Li, Qi, Chen and Zhou" in doc and "2103.04607" in doc and "Kim" not in doc
