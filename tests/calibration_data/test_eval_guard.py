"""The hashed 8-gram guard that keeps the evaluation text out of calibration."""

from pathlib import Path

import pytest

from rkv_convert.calibration_data import eval_guard
from rkv_convert.calibration_data.sources import load_text

WIKI_TEST = Path(__file__).resolve().parents[3] / "shared/data/wikitext-2-raw/wiki.test.raw"


def _story(seed: int, words: int) -> str:
    """Deterministic word salad: a stand-in evaluation text that needs no third-party data."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return " ".join(rng.choice(vocab) for _ in range(words))


def test_overlap_with_a_synthetic_hash_set() -> None:
    evaluation = _story(1, 40_000)
    hashes = eval_guard.hash_set(evaluation)
    assert 0 < len(hashes) < 40_000 / 4  # a sample, not every shingle
    same = eval_guard.overlap(evaluation.replace(" ", "\n", 100), hashes)
    assert same.fraction > 0.99
    other = eval_guard.overlap(_story(2, 40_000), hashes)
    assert other.fraction < 0.01
    third = len(evaluation) // 3
    mixed = eval_guard.overlap(_story(3, 30_000) + " " + evaluation[third : third + len(evaluation) // 3], hashes)
    assert 0.2 < mixed.fraction < 0.5
    assert eval_guard.overlap("too short", hashes).sampled == 0


def test_words_ignore_case_punctuation_and_spacing() -> None:
    assert eval_guard.words("The  game @-@ 's\nPlot: OK") == ["the", "game", "s", "plot", "ok"]


def test_committed_hash_set_loads_and_passes_other_text() -> None:
    hashes = eval_guard.evaluation_hashes()
    assert len(hashes) > 5_000
    assert eval_guard.overlap(load_text("pydoc"), hashes).fraction < 0.01


@pytest.mark.skipif(not WIKI_TEST.is_file(), reason=f"{WIKI_TEST} is absent (clean clone)")
def test_committed_hash_set_is_built_from_the_evaluation_text() -> None:
    text = WIKI_TEST.read_text(encoding="utf-8")
    assert eval_guard.hash_set(text) == eval_guard.evaluation_hashes()
    assert eval_guard.overlap(text + "\n", eval_guard.evaluation_hashes()).fraction > 0.99
