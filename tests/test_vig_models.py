"""ViG / ViG-H: official parameter names and shapes, strict loading of official-format
checkpoints (also at another resolution), published sizes, the timm-style interface."""

import importlib.util

import pytest
import torch

import vig
from official_vig_keys import HIERARCHICAL, PLAIN, PUBLISHED_MILLIONS, official_keys
from vig.checkpoint import resample_pos_embed

CLASSIFIERS = sorted(PLAIN) + sorted(HIERARCHICAL)
HAS_TIMM = importlib.util.find_spec("timm") is not None


def _on_meta(name, **kwargs):
    """Built on the meta device: names, shapes and counts without the cost of initialising
    89M parameters on a 2-core CI machine."""
    with torch.device("meta"):
        return vig.create_model(name, **kwargs)


def _shapes(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _official_checkpoint(name, seed=0, grid=None):
    """A synthetic checkpoint in the official container: random tensors with the official
    names and shapes (what ``torch.load`` of a released ``.pth`` gives)."""
    gen = torch.Generator().manual_seed(seed)
    keys = official_keys(name)
    if grid is not None:
        keys["pos_embed"] = (1, grid * grid, keys["pos_embed"][-1])
    state = {key: torch.randn(shape, generator=gen) for key, shape in keys.items()}
    return {"model": state, "optimizer": {}, "epoch": 299, "max_accuracy": 0.0}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_state_dict_matches_the_official_names_and_shapes(name):
    ours, theirs = _shapes(_on_meta(name)), official_keys(name)
    assert sorted(set(theirs) - set(ours)) == [], "official parameters our model lacks"
    assert sorted(set(ours) - set(theirs)) == [], "parameters the official checkpoints lack"
    wrong = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert wrong == {}


def test_official_vig_tiny_size_was_hand_computed():
    """ViG-T's official parameter total worked out by hand from the module definitions:
    stem 190,080 + pos_embed 37,632 + 12 blocks x 451,136 + norm 192 + head 193,000."""
    assert sum(torch.Size(s).numel() for s in official_keys("vig_tiny").values()) == 5_834_536
    assert len(official_keys("vig_tiny")) == 9 + 12 * 14 + 3  # stem + pos_embed, 14 tensors a block, norm + head


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_parameter_count_is_the_published_one(name):
    count = sum(p.numel() for p in _on_meta(name).parameters())
    assert abs(count / 1e6 - PUBLISHED_MILLIONS[name]) < 0.5, f"{name}: {count / 1e6:.2f}M"


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_official_checkpoint_loads_strictly_and_is_used(name):
    checkpoint = _official_checkpoint(name)
    model = vig.create_model(name)
    result = vig.load_checkpoint(model, checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in checkpoint["model"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_official_checkpoint_file_through_create_model(tmp_path):
    checkpoint = _official_checkpoint("vig_tiny", seed=3)
    checkpoint["model"] = {f"module.{k}": v for k, v in checkpoint["model"].items()}  # saved from DDP
    path = tmp_path / "vig_tiny.pth"
    torch.save(checkpoint, path)
    model = vig.create_model("vig_tiny", checkpoint_path=str(path))
    assert torch.equal(model.head.weight, checkpoint["model"]["module.head.weight"])


def test_checkpoint_errors_say_what_went_wrong(tmp_path):
    """A missing file is a missing file (no advice to unpickle); a file the weights-only
    unpickler refuses (a pickled config object) gets the weights_only=False hint."""
    model = vig.create_model("vig_tiny", depth=1, embed_dim=64, num_heads=2)
    with pytest.raises(FileNotFoundError):
        vig.load_checkpoint(model, tmp_path / "no_such_file.pth")
    with pytest.raises(FileNotFoundError):
        vig.create_model("vig_tiny", depth=1, embed_dim=64, num_heads=2, checkpoint_path=str(tmp_path / "missing.pth"))
    torch.save({"model": model.state_dict(), "config": _PickledConfig()}, tmp_path / "with_config.pth")
    with pytest.raises(ValueError, match="pass weights_only=False if you trust the file"):
        vig.load_checkpoint(model, tmp_path / "with_config.pth")
    result = vig.load_checkpoint(model, tmp_path / "with_config.pth", weights_only=False)
    assert not result.missing_keys and not result.unexpected_keys


class _PickledConfig:
    """Stands in for the config object official training checkpoints pickle."""


def test_official_checkpoint_at_another_resolution_resamples_pos_embed():
    checkpoint = _official_checkpoint("vig_tiny", seed=1)
    model = vig.create_model("vig_tiny", img_size=320)  # 20 x 20 tokens
    vig.load_checkpoint(model, checkpoint, strict=True)
    assert model.pos_embed.shape == (1, 400, 192)
    expected = resample_pos_embed(checkpoint["model"]["pos_embed"], (14, 14), (20, 20))
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.blocks[3].attn.qkv_proj.weight, checkpoint["model"]["blocks.3.attn.qkv_proj.weight"])


def test_resample_pos_embed_is_bicubic_on_the_token_grid():
    gen = torch.Generator().manual_seed(0)
    # a smooth function of the grid position is reproduced by resampling (up to interpolation)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 14), torch.linspace(0, 1, 14), indexing="ij")
    pos = torch.stack([rows, cols, rows * cols], dim=-1).reshape(1, 196, 3)
    same = resample_pos_embed(pos, (14, 14), (14, 14))
    assert same is pos
    up = resample_pos_embed(pos, (14, 14), (28, 21)).reshape(28, 21, 3)
    # bicubic keeps the row index constant along rows and orders values along columns
    assert torch.allclose(up[:, :, 0], up[:, :1, 0].expand(28, 21), atol=1e-6)
    assert (up[:, 1:, 1] >= up[:, :-1, 1] - 1e-6).all()
    assert up[0, 0, 1] < 0.05 and up[-1, -1, 1] > 0.95
    with pytest.raises(ValueError, match="pos_embed has 196 tokens"):
        resample_pos_embed(torch.randn(1, 196, 3, generator=gen), (10, 10), (14, 14))


def test_native_checkpoint_round_trip_at_other_resolution(tmp_path):
    torch.manual_seed(0)
    source = vig.create_model("vig_tiny", num_classes=7, depth=2, embed_dim=64, num_heads=2)
    torch.save({"model": source.state_dict()}, tmp_path / "native.pt")
    target = vig.create_model("vig_tiny", num_classes=7, depth=2, embed_dim=64, num_heads=2, img_size=160,
                              checkpoint_path=str(tmp_path / "native.pt"))
    x = torch.randn(1, 3, 160, 160)
    # at the source's own grid the resampled embedding would be the original one: compare there
    source_at_160 = source.position_embedding((10, 10))
    assert torch.allclose(target.position_embedding((10, 10)), source_at_160)
    assert torch.allclose(target(x), source(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vig_tiny", "vig_small", "vig_h_tiny"])  # the base sizes share the code
def test_forward_backward_small_input(name):
    torch.manual_seed(0)
    small = dict(depth=1) if name in PLAIN else dict(depths=(1, 1, 1, 1))
    model = vig.create_model(name, num_classes=5, **small)
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.ndim == 4 and features.shape[0] == 2 and features.shape[-1] == model.num_features
    logits = model.forward_head(features)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_same_forward_in_train_and_eval():
    torch.manual_seed(0)
    model = vig.create_model("vig_tiny", num_classes=3, depth=2, embed_dim=48, num_heads=2, drop_path_rate=0.0)
    x = torch.randn(2, 3, 48, 48)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_bad_images_get_errors_that_say_what_was_expected(name):
    model = vig.create_model(name, num_classes=3, **({"depths": (1, 1, 1, 1)} if "_h_" in name else
                                                     {"depth": 1, "embed_dim": 64, "num_heads": 2}))
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, H, W\] \(in_chans=3\), got \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="images must be floating point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_reset_classifier_and_create_model_errors():
    model = vig.create_model("vig_h_tiny", depths=(1, 1, 1, 1), num_classes=4)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="unknown model name"):
        vig.create_model("vig_gigantic")
    with pytest.raises(ValueError, match="no hosted weights"):
        vig.create_model("vig_tiny", pretrained=True)
    with pytest.raises(ValueError, match="expand_v must be 1"):
        vig.create_model("vig_tiny", expand_v=2.0)
    with pytest.raises(ValueError, match="num_heads=5"):
        vig.create_model("vig_tiny", num_heads=5)
    # reset_classifier checks its pooling as the constructor does (a bad value once left the
    # head to classify every token)
    plain = vig.create_model("vig_tiny", depth=1, embed_dim=64, num_heads=2)
    for m in (model, plain):
        with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
            m.reset_classifier(3, "max")
        m.reset_classifier(3, "avg")
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_timm_create_model(name):
    import timm

    assert name in timm.list_models("vig*")
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3)
    assert type(model) is type(_on_meta(name))
    assert model.get_classifier().out_features == 3
    assert _shapes(model) == _shapes(_on_meta(name, num_classes=3))
    assert model.pretrained_cfg["classifier"] in ("head", "classifier.head")


def _non_square_source(img_size):
    torch.manual_seed(3)
    return vig.create_model("vig_tiny", num_classes=7, depth=1, embed_dim=64, num_heads=2, img_size=img_size)


def test_checkpoint_trained_at_a_non_square_grid_loads_from_its_record_or_source_grid():
    """8 x 18 tokens (128 x 288 px) count 144 = 12 x 12: read as square, the position embedding
    would be resampled from the wrong grid without a word. vig.train's checkpoints record the
    model's ``img_size``; other containers pass ``source_grid``; both resample from 8 x 18."""
    source = _non_square_source((128, 288))
    assert source.patch_grid == (8, 18)
    expected = resample_pos_embed(source.pos_embed.detach(), (8, 18), (14, 14))
    recorded = {"model": source.state_dict(), "model_kwargs": {"img_size": (128, 288), "num_classes": 7}}
    bare = {"model": source.state_dict()}
    for checkpoint, grid in ((recorded, None), (bare, (8, 18))):
        target = vig.create_model("vig_tiny", num_classes=7, depth=1, embed_dim=64, num_heads=2)
        vig.load_checkpoint(target, checkpoint, source_grid=grid)
        assert torch.equal(target.pos_embed.detach(), expected)
    wrong = resample_pos_embed(source.pos_embed.detach(), (12, 12), (14, 14))
    assert not torch.allclose(expected, wrong, atol=1e-3)  # the square reading is a different embedding
    # into a model at 12 x 12 tokens: the same token count, still a different grid
    square = vig.create_model("vig_tiny", num_classes=7, depth=1, embed_dim=64, num_heads=2, img_size=192)
    assert square.patch_grid == (12, 12)
    vig.load_checkpoint(square, recorded)
    assert torch.equal(square.pos_embed.detach(), resample_pos_embed(source.pos_embed.detach(), (8, 18), (12, 12)))


def test_a_non_square_token_count_without_a_record_asks_for_source_grid():
    source = _non_square_source((128, 160))  # 8 x 10 = 80 tokens: no square grid
    target = vig.create_model("vig_tiny", num_classes=7, depth=1, embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match="source_grid"):
        vig.load_checkpoint(target, {"model": source.state_dict()})
    with pytest.raises(ValueError, match="source_grid: HierViG has no position embedding"):
        vig.load_checkpoint(vig.create_model("vig_h_tiny"), {"model": {}}, source_grid=(8, 10))
