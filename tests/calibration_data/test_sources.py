import json

import pytest
import torch
from tiny_models import tiny_tokenizer

from rkv_convert.calibration_data.sources import CalibrationDataError, load_text, sample_batches

WIKI_TEST = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def test_builtin_source_is_pythons_own_docs() -> None:
    text = load_text("pydoc")
    assert len(text) > 100_000 and "for" in text


def test_sampling_is_seeded_and_shaped() -> None:
    tok = tiny_tokenizer()
    text = load_text("pydoc")
    a = sample_batches(text, tok, 3, 40, seed=7)
    b = sample_batches(text, tok, 3, 40, seed=7)
    c = sample_batches(text, tok, 3, 40, seed=8)
    assert a.shape == (3, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix: str) -> None:
    rows = [f"paragraph {i} about caches and keys" for i in range(5)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": r}) for r in rows))
    else:
        import datasets

        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(path))
    text = load_text(str(path))
    assert all(r in text for r in rows)


def test_evaluation_text_is_refused(tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="evaluates on"):
        load_text(WIKI_TEST)
    renamed = tmp_path / "innocent.txt"
    renamed.write_bytes(open(WIKI_TEST, "rb").read())
    with pytest.raises(CalibrationDataError, match="evaluates on"):
        load_text(str(renamed))


def test_unknown_and_missing_sources(tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="unknown calibration source"):
        load_text("nonsense")
    with pytest.raises(CalibrationDataError, match="not found"):
        load_text(str(tmp_path / "absent.txt"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CalibrationDataError, match="unsupported"):
        load_text(str(tmp_path / "x.csv"))


def test_hub_source_offline_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match="Offline"):
        load_text("wikitext2")


def test_too_little_text() -> None:
    with pytest.raises(CalibrationDataError, match="fewer than seqlen"):
        sample_batches("short text", tiny_tokenizer(), 1, 512, 0)
