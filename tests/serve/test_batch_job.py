"""``rkv run --prompts/--out``: every good line answered, bad lines named by number and skipped,
a killed job resumed without redoing finished ids, and greedy text equal to the request run alone."""

import json
import re
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))  # the tiny-checkpoint fixtures live beside the runtime tests
from rkv_fixtures import tiny_serving_folder  # noqa: E402

from rkv_convert.runtime.cli import run_command  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_serving_folder(tmp_path_factory.mktemp("rkv") / "tiny-rkv")


def _run(*args: str):
    app = typer.Typer()
    app.command("run")(run_command)
    app.command("noop")(lambda: None)
    return CliRunner().invoke(app, ["run", *args])


LINES = [
    {"id": "a", "prompt": "The cat sat on", "max_tokens": 12, "temperature": 0},
    {"id": 7, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 9, "temperature": 0},
    "this is not json",
    {"prompt": "no id"},
    {"id": "c", "prompt": "x" * 600},  # beyond the 512-token context
    {"id": "d", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0},
    {"id": "a", "prompt": "duplicate id"},
    {"id": "e", "prompt": "Sampled with a seed", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"id": "f", "prompt": "abc", "max_tokens": 0},
]
GOOD = {"a", "7", "d", "e"}


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_job_answers_good_lines_and_names_bad_ones(folder, tmp_path) -> None:
    prompts = _write(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    result = _run(str(folder), "--prompts", str(prompts), "--out", str(out), "--device", "cpu", "--max-batch", "3")
    assert result.exit_code == 0, result.output
    for number, reason in [(3, "not JSON"), (4, "needs an \"id\""), (5, "this model's context is 512 tokens"), (7, "earlier line"),
                           (9, "max_tokens must be from 1")]:  # fmt: skip
        assert re.search(rf"in\.jsonl:{number}: skipped: [^\n]*{re.escape(reason)}", result.output), (number, result.output)
    records = _records(out)
    assert set(records) == GOOD
    assert records["a"]["completion_tokens"] == 12 and records["a"]["finish_reason"] == "length"
    assert all(r["text"] is not None and "error" not in r for r in records.values())

    # the same greedy request alone, through the single-prompt path of rkv run, gives the same text
    alone = _run(str(folder), "-p", "The cat sat on", "-n", "12", "--greedy", "--no-chat", "--device", "cpu")
    assert alone.exit_code == 0, alone.output
    assert records["a"]["text"] in alone.stdout

    # resume: a job killed after two lines and half a third reruns only what is missing
    kept = out.read_text().splitlines()[:2]
    out.write_text("\n".join(kept) + "\n" + '{"id": "x", "te')
    again = _run(str(folder), "--prompts", str(prompts), "--out", str(out), "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "last line was cut short" in " ".join(again.output.split())
    resumed = _records(out)
    assert len(out.read_text().splitlines()) == len(GOOD)  # nothing done twice
    assert resumed == records  # greedy and seeded requests give the same text on the re-run
    third = _run(str(folder), "--prompts", str(prompts), "--out", str(out), "--device", "cpu")
    assert third.exit_code == 0 and len(out.read_text().splitlines()) == len(GOOD)


def test_prompts_needs_out(folder, tmp_path) -> None:
    prompts = _write(tmp_path / "in.jsonl", LINES[:1])
    result = _run(str(folder), "--prompts", str(prompts), "--device", "cpu")
    assert result.exit_code != 0 and "--prompts and --out go together" in " ".join(result.output.split())
