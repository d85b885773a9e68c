"""The handler's stages as pure functions: parity with training, TTA invariants, answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from handler.errors import SpecError
from handler.inference import Policy, check_model, classify
from handler.postprocess import answer
from handler.preprocess import Prepared, bytes_to_tensor, image_to_tensor, prepare
from scripts.train.data import eval_tensors, fashion_spec
from tests.conftest import TinyCNN, png_bytes


@pytest.fixture(scope="module")
def model():
    return torch.jit.script(TinyCNN().eval())


def test_handler_tensor_equals_training_eval_tensor(holdout):
    """The server's tensor for a PNG upload is bit-identical to training's eval tensor."""
    images, _ = holdout
    spec = fashion_spec()
    training = eval_tensors(images[:32], spec)
    for i in range(32):
        slot = prepare({"body": png_bytes(images[i])}, {}, spec)
        assert isinstance(slot, Prepared)
        assert torch.equal(slot.tensors[0], training[i])


def test_rgb_and_rgba_uploads_reduce_to_the_same_tensor():
    spec = fashion_spec()
    gray = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 255, np.uint8)], axis=-1)
    expected = bytes_to_tensor(png_bytes(gray), spec)
    assert torch.allclose(bytes_to_tensor(png_bytes(rgb), spec), expected, atol=1e-6)
    assert torch.allclose(bytes_to_tensor(png_bytes(rgba), spec), expected, atol=1e-6)


def test_transparent_pixels_become_the_background():
    spec = fashion_spec()
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent
    tensor = bytes_to_tensor(png_bytes(rgba, mode="RGBA"), spec)
    background = (0 / 255 - spec.mean[0]) / spec.std[0]
    assert torch.allclose(tensor, torch.full_like(tensor, background))


def test_pad_policy_keeps_aspect_ratio_and_centres():
    spec = fashion_spec(canonical=None)
    wide = Image.new("L", (56, 28), 255)
    tensor = image_to_tensor(wide, spec)
    white = (1.0 - spec.mean[0]) / spec.std[0]
    assert torch.allclose(tensor[0, 7:21, :], torch.full((14, 28), white))  # 56x28 -> 28x14, centred
    assert torch.all(tensor[0, :7, :] < 0) and torch.all(tensor[0, 21:, :] < 0)


@pytest.mark.parametrize("tta", [("identity",), ("identity", "hflip"), ("identity", "hflip", "shift(1,0)", "zoom(1.1)")])
@pytest.mark.parametrize("merge", ["mean_prob", "mean_logit"])
def test_probabilities_are_a_distribution(model, tta, merge):
    spec = fashion_spec(tta=tta, merge=merge, temperature=1.7)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    result = classify(model, x, torch.tensor([True, False] * 3), Policy.from_spec(spec))
    assert result.probs.shape == (6, 10)
    assert torch.all(result.probs >= 0) and torch.all(result.probs <= 1)
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(6), atol=1e-6)
    assert result.n_views.tolist() == [len(tta), 1] * 3


def test_identity_only_tta_equals_no_tta(model):
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    policy = Policy.from_spec(fashion_spec(tta=("identity",)))
    on = classify(model, x, torch.ones(5, dtype=torch.bool), policy)
    off = classify(model, x, torch.zeros(5, dtype=torch.bool), policy)
    assert torch.allclose(on.probs, off.probs, atol=1e-6)


def test_flip_tta_on_a_symmetric_image_equals_no_tta(model):
    half = torch.randn(3, 1, 28, 14, generator=torch.Generator().manual_seed(5))
    x = torch.cat([half, torch.flip(half, dims=(-1,))], dim=-1)  # left-right symmetric
    policy = Policy.from_spec(fashion_spec(tta=("identity", "hflip")))
    on = classify(model, x, torch.ones(3, dtype=torch.bool), policy)
    off = classify(model, x, torch.zeros(3, dtype=torch.bool), policy)
    assert torch.allclose(on.probs, off.probs, atol=1e-6)
    assert not on.disagree.any()


def test_tta_changes_the_answer_on_an_asymmetric_image(model):
    """The invariants above are not vacuous: flip TTA does change an asymmetric input's probabilities."""
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    policy = Policy.from_spec(fashion_spec(tta=("identity", "hflip")))
    on = classify(model, x, torch.ones(3, dtype=torch.bool), policy)
    off = classify(model, x, torch.zeros(3, dtype=torch.bool), policy)
    assert not torch.allclose(on.probs, off.probs, atol=1e-4)


def test_mixed_batch_rows_match_their_single_answers(model):
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([True, False, True, False])
    policy = Policy.from_spec(fashion_spec(tta=("identity", "hflip", "shift(1,0)")))
    batch = classify(model, x, mask, policy)
    for i in range(4):
        alone = classify(model, x[i : i + 1], mask[i : i + 1], policy)
        assert torch.allclose(batch.probs[i], alone.probs[0], atol=1e-5)


def test_top_k_is_sorted_and_mapped_to_labels():
    spec = fashion_spec()
    probs = torch.softmax(torch.tensor([0.1, 2.0, -1.0, 3.0, 0.0, 0.5, 1.0, -2.0, 0.2, 0.3]), dim=0)
    body = answer(probs, spec, top_k=4, n_views=2)
    ranked = [entry["probability"] for entry in body["top_k"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == 4
    assert [e["class_index"] for e in body["top_k"]] == [3, 1, 6, 5]
    assert all(e["label"] == spec.class_names[e["class_index"]] for e in body["top_k"])
    assert body["label"] == "Dress" and body["confidence"] == body["top_k"][0]["probability"]
    assert body["tta_views"] == 2


def test_uncertain_follows_the_threshold():
    flat = torch.full((10,), 0.1)
    assert answer(flat, fashion_spec(threshold=0.5), 3, 1)["uncertain"] is True
    assert answer(flat, fashion_spec(threshold=0.05), 3, 1)["uncertain"] is False


class _AlwaysDropout(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x.flatten(1)[:, :10], p=0.5, training=True)


def test_a_model_with_dropout_left_on_is_refused_at_load():
    with pytest.raises(SpecError, match="training mode"):
        check_model(torch.jit.script(_AlwaysDropout()), fashion_spec())


def test_a_model_with_the_wrong_number_of_outputs_is_refused():
    with pytest.raises(SpecError, match="expects"):
        check_model(torch.jit.script(TinyCNN(classes=7).eval()), fashion_spec())
