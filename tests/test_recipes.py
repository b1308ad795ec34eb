"""The loss recipes (reid_ext.recipes): compositions of the nn.Module losses, with their own classifiers."""
import pytest
import torch
import torch.nn.functional as F

import reid_ext
from reid_ext.losses import CosineSoftmaxLoss, SoftmaxLoss
from reid_ext.models import MGN, UBATNet
from reid_ext.recipes import MGNLoss, UBATLoss, build_recipe

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
MODALITIES = torch.tensor([0, 1] * 4)


def _tiny_model(name):
    torch.manual_seed(0)
    if name == "mgn":
        return MGN(width=0.0625, feat_dim=8)
    return UBATNet(width=0.0625, feat_dim=8)


@pytest.mark.parametrize("model_name", ["mgn", "ubat"])
@pytest.mark.parametrize("recipe", ["mgn", "ubat"])
def test_recipes_give_finite_losses_and_gradients(model_name, recipe):
    model = _tiny_model(model_name)
    out = model(torch.randn(8, 3, 96, 32))
    criterion = build_recipe(recipe, 4, model.id_feature_dims)
    loss, parts = criterion(out, LABELS, MODALITIES)
    assert torch.isfinite(loss) and loss.dim() == 0
    expected = {"id", "triplet"} | ({"hetero_center"} if recipe == "ubat" else set())
    assert set(parts) == expected
    loss.backward()
    for p in list(model.parameters()) + list(criterion.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_recipes_own_one_classifier_per_identity_feature():
    model = _tiny_model("mgn")
    mgn = build_recipe("mgn", 4, model.id_feature_dims)
    assert all(isinstance(c, SoftmaxLoss) for c in mgn.classifiers)
    assert [tuple(c.weight.shape) for c in mgn.classifiers] == [(4, d) for d in model.id_feature_dims]
    ubat = build_recipe("ubat", 4, [8], scale=10.0, cos_margin=0.1)
    (classifier,) = ubat.classifiers
    assert isinstance(classifier, CosineSoftmaxLoss) and (classifier.scale, classifier.margin) == (10.0, 0.1)
    # the classifier weights are the recipe's parameters, the losses' hyper-parameters are not
    assert [p.shape for p in ubat.parameters()] == [torch.Size([4, 8])]


def test_mgn_recipe_places_softmax_on_pooled_and_stripes_and_triplet_on_reduced_globals():
    model = _tiny_model("mgn")
    out = model(torch.randn(8, 3, 96, 32))
    recipe = MGNLoss(4, model.id_feature_dims)
    loss, parts = recipe(out, LABELS)
    weights = [c.weight for c in recipe.classifiers]
    ce = [F.cross_entropy(f @ w.t(), LABELS) for f, w in zip(out.global_features + out.features[3:], weights)]
    tri = [reid_ext.reference.batch_hard_triplet_loss(r, LABELS, margin=1.2) for r in out.features[:3]]
    torch.testing.assert_close(parts["id"], torch.stack(ce).mean())
    torch.testing.assert_close(parts["triplet"], torch.stack(tri).mean())
    torch.testing.assert_close(loss, torch.stack(ce).mean() + torch.stack(tri).mean())


def test_ubat_recipe_on_the_ubat_network_takes_its_one_embedding():
    model = _tiny_model("ubat")
    out = model(torch.randn(8, 3, 96, 32))
    recipe = UBATLoss(4, model.id_feature_dims)
    loss, parts = recipe(out, LABELS, MODALITIES)
    (weight,) = [c.weight for c in recipe.classifiers]
    emb = out.embedding
    cos = reid_ext.reference.cosine_softmax_loss(emb, weight, LABELS, scale=16.0, margin=0.2)
    tri = reid_ext.reference.unified_triplet_loss(emb, LABELS)
    hc = reid_ext.reference.hetero_center_triplet_loss(emb, LABELS, MODALITIES)
    torch.testing.assert_close(parts["id"], cos)
    torch.testing.assert_close(parts["triplet"], tri)
    torch.testing.assert_close(parts["hetero_center"], hc)
    torch.testing.assert_close(loss, cos + tri + hc)


def test_ubat_recipe_leaves_out_the_hetero_center_term_for_one_modality():
    model = _tiny_model("ubat")
    out = model(torch.randn(8, 3, 96, 32))
    _, parts = UBATLoss(4, model.id_feature_dims)(out, LABELS, torch.zeros(8, dtype=torch.long))
    assert set(parts) == {"id", "triplet"}


def test_recipe_checks_its_classifiers_against_the_output():
    model = _tiny_model("mgn")
    out = model(torch.randn(8, 3, 96, 32))
    with pytest.raises(ValueError, match="the recipe has 1 classifiers but the output has 8 identity features"):
        build_recipe("mgn", 4, [8])(out, LABELS)


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ValueError, match="recipe must be one of 'mgn', 'ubat', got 'arcface'"):
        build_recipe("arcface", 4, [8])


def test_ubat_is_credited_to_its_authors():
    from reid_ext import recipes
    from reid_ext.models import ubat

    for doc in (recipes.__doc__, ubat.__doc__):
        assert "Li, Qi, Chen and Zhou" in doc and "2103.04607" in doc and "Kim" not in doc


def test_defaults_are_the_ones_the_functions_use():
    from reid_ext import defaults

    assert UBATLoss(4, [8]).classifiers[0].scale == defaults.UBAT_COS_SCALE
    assert MGNLoss(4, [8]).triplet.margin == defaults.MGN_TRIPLET_MARGIN
    x, labels = torch.randn(8, 5, dtype=torch.float64), LABELS
    torch.testing.assert_close(
        reid_ext.unified_triplet_loss(x, labels),
        reid_ext.unified_triplet_loss(x, labels, gamma=defaults.UNIFIED_GAMMA, margin=defaults.UNIFIED_MARGIN),
    )


def test_softmax_loss_is_the_cross_entropy_of_its_own_linear_classifier():
    torch.manual_seed(0)
    loss_fn = SoftmaxLoss(num_classes=4, dim=8, label_smoothing=0.1, dtype=torch.float64)
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    expected = F.cross_entropy(x @ loss_fn.weight.t(), LABELS, label_smoothing=0.1)
    torch.testing.assert_close(loss_fn(x, LABELS), expected)
    assert loss_fn.weight.std() < 0.01  # N(0, CLASSIFIER_INIT_STD^2) rows
    assert "num_classes=4" in repr(loss_fn) and "label_smoothing=0.1" in repr(loss_fn)
    with pytest.raises(ValueError, match="num_classes and dim must be >= 1"):
        SoftmaxLoss(num_classes=4, dim=0)
