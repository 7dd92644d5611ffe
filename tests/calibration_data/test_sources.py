import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_tokenizer

from rkv_convert.calibration_data.sources import CalibrationDataError, check_source, load_text, sample_batches

WIKI_TEST = Path(__file__).resolve().parents[3] / "shared/data/wikitext-2-raw/wiki.test.raw"
needs_wiki = pytest.mark.skipif(not WIKI_TEST.is_file(), reason=f"{WIKI_TEST} is absent (clean clone)")


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


@needs_wiki
def test_evaluation_text_is_refused(tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="evaluates on"):
        load_text(str(WIKI_TEST))
    renamed = tmp_path / "innocent.txt"
    renamed.write_bytes(WIKI_TEST.read_bytes())
    with pytest.raises(CalibrationDataError, match="evaluates on"):
        load_text(str(renamed))


@needs_wiki
def test_an_edited_copy_of_the_evaluation_text_is_refused(tmp_path) -> None:
    """One extra newline changes the file's hash, not its word 8-grams."""
    copy = tmp_path / "notes.txt"
    copy.write_bytes(WIKI_TEST.read_bytes() + b"\n")
    with pytest.raises(CalibrationDataError, match=r"notes.txt shares \d+% of its 8-word sequences with the WikiText-2 test split"):
        load_text(str(copy))


@needs_wiki
def test_a_slice_of_the_evaluation_text_mixed_with_other_text_is_refused(tmp_path) -> None:
    wiki = WIKI_TEST.read_text(encoding="utf-8")
    start = len(wiki) // 3
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(load_text("pydoc") + "\n\n" + wiki[start : start + int(0.3 * len(wiki))], encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="WikiText-2 test split"):
        load_text(str(mixed))


def test_other_text_passes_the_overlap_guard(tmp_path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text(load_text("pydoc"), encoding="utf-8")
    assert load_text(str(path)).strip()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty.txt is empty"),
        (b"  \n\n \t\n", "empty.txt has no text (only whitespace)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50, "empty.txt is not text (NUL bytes: a binary file?)"),
        ("caf\u00e9 latin-1 text ".encode("latin-1") * 20, "empty.txt is not UTF-8 text (invalid byte at offset 3)"),
    ],
)
def test_empty_and_binary_files_are_named(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError) as info:
        check_source(str(path))
    assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CalibrationDataError, match="empty.txt"):
        load_text(str(path))


@pytest.mark.parametrize("suffix,content,message", [
    (".jsonl", b"", "is empty"),
    (".jsonl", b"\x00\x01\x02\x03" * 100, "is not text"),
    (".parquet", b"not a parquet file at all", "is not a parquet file"),
    (".jsonl", b"{not json}\n", "cannot read"),
])
def test_bad_structured_files_are_named_and_leave_no_cache(tmp_path, monkeypatch, suffix, content, message) -> None:
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=message) as info:
        load_text(str(path))
    assert str(path) in str(info.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_reading_a_jsonl_file_leaves_no_datasets_cache(tmp_path, monkeypatch) -> None:
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)))
    assert "row 4" in load_text(str(path))
    assert not cache.exists() or not any(cache.iterdir())


def test_unreadable_file_is_named(tmp_path) -> None:
    import os

    path = tmp_path / "secret.txt"
    path.write_text("some text")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as a user who reads everything (root)")
    with pytest.raises(CalibrationDataError, match="cannot read .*secret.txt"):
        check_source(str(path))


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
