"""Output folders written atomically through a temp folder whose leftovers the next run removes."""

import os

import pytest

from rkv_convert.outdir import atomic_dir, atomic_write_text, check_output_dir, remove_stale_temp_dirs


def test_writes_through_a_named_temp_folder_and_renames(tmp_path) -> None:
    out = tmp_path / "ck"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".ck.rkv-tmp-{os.getpid()}-")
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_failure_leaves_nothing_and_keeps_the_old_output(tmp_path) -> None:
    out = tmp_path / "ck"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and (out / "old.txt").is_file()


def test_stale_temp_folders_of_the_same_output_are_removed(tmp_path) -> None:
    out = tmp_path / "ck"
    dead = tmp_path / ".ck.rkv-tmp-999999999-x1y2z3"
    legacy = tmp_path / ".ck.ab_cd123"  # tempfile.mkdtemp(prefix=".ck.") of earlier releases
    alive = tmp_path / f".ck.rkv-tmp-{os.getpid()}-q"
    unrelated = [tmp_path / ".ckpt.rkv-tmp-999999999-x", tmp_path / ".ck.notes", tmp_path / "ck.rkv-tmp-999999999-x"]
    for folder in (dead, legacy, alive, *unrelated):
        folder.mkdir()
        (folder / "weights").write_bytes(b"partial")
    removed = remove_stale_temp_dirs(out)
    assert sorted(removed) == sorted([dead, legacy])
    assert alive.exists() and all(u.exists() for u in unrelated)
    with atomic_dir(out):
        pass
    assert alive.exists()


def test_output_checks(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        check_output_dir(afile, overwrite=True)
    with pytest.raises(NotADirectoryError, match="afile is a file"):
        check_output_dir(afile / "sub", overwrite=False)
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output_dir(tmp_path / "ck", overwrite=False)
    check_output_dir(tmp_path / "ck", overwrite=True)
    check_output_dir(tmp_path / "new" / "ck", overwrite=False)


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # a write that fails halfway: the old file stays, no temp is left
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
