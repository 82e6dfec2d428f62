"""The MiniCarve alignment evaluator: attributes per grammar case, chance, scoring, weights round trip."""

import pytest
import torch

from minicarve.alignment import (
    IGNORE,
    AlignmentClassifier,
    AlignmentConfig,
    AlignmentEvaluator,
    NotAMiniCarvePrompt,
    attribute_vocab,
    chance_accuracy,
    palette_decompose,
    scene_targets,
    stated_attributes,
)
from minicarve.dataset import scene_from_prompt
from minicarve.scenes import COLORS

ONE = "a large red cube"
TWO = "a small blue sphere on top of a large green cylinder"
THREE = "a red cone, a blue torus and a yellow cube"


def test_stated_attributes_per_grammar_case():
    assert stated_attributes(ONE) == {"count": "1", "part0.shape": "cube", "part0.color": "red",
                                      "part0.size": "large"}
    assert stated_attributes(TWO) == {
        "count": "2", "relation": "on top of",
        "part0.shape": "sphere", "part0.color": "blue", "part0.size": "small",
        "part1.shape": "cylinder", "part1.color": "green", "part1.size": "large",
    }
    # Three-part rows name no sizes (and no relation); slots follow the prompt's order.
    assert stated_attributes(THREE) == {
        "count": "3", "part0.shape": "cone", "part0.color": "red", "part1.shape": "torus",
        "part1.color": "blue", "part2.shape": "cube", "part2.color": "yellow",
    }
    assert stated_attributes(scene_from_prompt(TWO)) == stated_attributes(TWO)


def test_training_targets_use_none_for_absent_and_ignore_unnamed_sizes():
    vocab = attribute_vocab()
    one = scene_targets(scene_from_prompt(ONE))
    assert vocab["relation"][one["relation"]] == "none"
    assert vocab["part1.shape"][one["part1.shape"]] == "none"
    assert vocab["part2.size"][one["part2.size"]] == "none"
    three = scene_targets(scene_from_prompt(THREE))
    assert three["part0.size"] == three["part2.size"] == IGNORE  # present but not named
    assert vocab["part2.color"][three["part2.color"]] == "yellow"


def test_chance_on_hand_examples():
    one = (1 / 3 + 1 / 5 + 1 / 6 + 1 / 2) / 4  # count, shape, colour, size
    two = (1 / 3 + 1 / 3 + 2 * (1 / 5 + 1 / 6 + 1 / 2)) / 8  # + relation, two parts
    three = (1 / 3 + 3 * (1 / 5 + 1 / 6)) / 7  # no sizes
    assert chance_accuracy([ONE]) == pytest.approx(0.3)
    assert chance_accuracy([ONE, TWO, THREE]) == pytest.approx((one + two + three) / 3)
    assert AlignmentEvaluator.chance([THREE]) == pytest.approx(three)


def test_bad_prompt_is_a_clear_error():
    with pytest.raises(NotAMiniCarvePrompt, match="not a MiniCarve prompt"):
        stated_attributes("a photo of a cat")
    with pytest.raises(ValueError, match="not a MiniCarve prompt"):
        chance_accuracy([ONE, "a large red dodecahedron"])


def test_random_model_round_trip_and_score(tmp_path):
    torch.manual_seed(0)
    model = AlignmentClassifier(AlignmentConfig()).eval()
    model.save_pretrained(tmp_path / "alignment")
    assert {p.name for p in (tmp_path / "alignment").iterdir()} == {"config.json", "model.safetensors"}
    loaded = AlignmentClassifier.from_pretrained(tmp_path / "alignment")
    grids = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    reloaded = loaded(grids)
    for head, logits in model(grids).items():
        torch.testing.assert_close(reloaded[head], logits)
    # uint8 and [0, 1] float grids are the same input.
    torch.testing.assert_close(loaded(grids)["count"], loaded(grids.float() / 255)["count"])
    evaluator = AlignmentEvaluator(weights=tmp_path / "alignment")
    scores = evaluator.score(grids, [ONE, TWO, THREE])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    # Each score is a fraction of the prompt's stated attributes.
    for score, prompt in zip(scores, [ONE, TWO, THREE]):
        n = len(stated_attributes(prompt))
        assert float(score * n) == pytest.approx(round(float(score * n)), abs=1e-5)
    with pytest.raises(ValueError, match="grids but"):
        evaluator.score(grids, [ONE])
    with pytest.raises(FileNotFoundError, match="train_alignment"):
        AlignmentClassifier.from_pretrained(tmp_path / "missing")


def test_score_counts_recovered_stated_attributes():
    class Oracle(torch.nn.Module):  # predicts given attribute dicts
        def __init__(self, answers):
            super().__init__()
            self.answers = answers

        def predict(self, grids):
            return self.answers

    vocab = attribute_vocab()
    full = {h: "none" for h in vocab}
    right = {**full, **stated_attributes(TWO)}
    wrong_colour = {**right, "part1.color": "red"}
    unnamed_size_wrong = {**full, **stated_attributes(THREE), "part0.size": "small"}  # not stated: not scored
    evaluator = AlignmentEvaluator(model=Oracle([right, wrong_colour, unnamed_size_wrong]))
    scores = evaluator.score(torch.zeros(3, 3, 64, 64), [TWO, TWO, THREE])
    torch.testing.assert_close(scores, torch.tensor([1.0, 7 / 8, 1.0]))


def test_palette_decompose_separates_coverage_shading_and_colour():
    # Pixels composited like the renderer: (1 - a) * white + a * s * albedo.
    names = list(COLORS)
    coverage = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.8, 1.0])
    shading = torch.tensor([1.0, 0.9, 1.0, 0.4, 0.7, 1.0])
    albedo = torch.tensor([COLORS[n] for n in names])  # one pixel per palette colour
    pixels = (1 - coverage[:, None]) + (coverage * shading)[:, None] * albedo
    grid = pixels.T.reshape(1, 3, 1, 6)
    a, w, membership = palette_decompose(grid)
    torch.testing.assert_close(a.flatten(), coverage, atol=1e-4, rtol=0)
    torch.testing.assert_close(w.flatten(), coverage * shading, atol=1e-4, rtol=0)
    assert membership[0, :, 0, 1:].argmax(dim=0).tolist() == list(range(1, 6))  # background pixel 0 aside
    assert float(membership[0, :, 0, 0].sum()) == pytest.approx(0.0, abs=1e-4)
