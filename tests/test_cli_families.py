"""The whole CLI (calibrate → export → eval → run) on a tiny random model of every new family, from a
folder written by ``save_pretrained``, with the default (folded) key layout, and Gemma 2 (soft-capped
logits) also in the pre-RoPE key layout."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rkv_convert.cli import app

runner = CliRunner()
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "phi3", "phi4mini", "gemma2", "gemma3")


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def _stock_perplexity(folder, text, length: int) -> float:
    # eager: transformers 5.17 loads Gemma 2 with SDPA, which drops the soft cap silently (5.24 refuses SDPA)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok(text.read_text(), add_special_tokens=False)["input_ids"][:length])[None]
    with torch.no_grad():
        logits = model(ids).logits.float()
    return math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())


@pytest.mark.parametrize("family,layout", [(f, "folded") for f in FAMILIES] + [("gemma2", "prerope")])
def test_calibrate_export_eval_run(tmp_path, pipeline_texts, family: str, layout: str) -> None:
    calib, evaltext = pipeline_texts
    model = save_tiny_model(tmp_path / "model", family, n_kv=2)
    cal, ck = tmp_path / "cal", tmp_path / "ck"
    _ok(runner.invoke(app, ["calibrate", str(model), "--out", str(cal), "--data", str(calib), "--samples", "2",
                            "--seqlen", "64", "--device", "cpu", "--key-group-size", "32", "--key-layout", layout]))  # fmt: skip
    _ok(runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2",
                            "--recent-window", "4", "--flush-block", "4", "--max-sinks", "1"]))  # fmt: skip
    assert json.loads((ck / "config.json").read_text())["rkv"]["key_layout"] == layout
    result = runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "1", "--length", "64",
                                 "--schemes", "fp,rotatekv", "--bits", "2", "--device", "cpu", "--json"])  # fmt: skip
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    fp = next(r["perplexity"] for r in rows if r["scheme"] == "fp")
    assert math.isclose(fp, _stock_perplexity(model, evaltext, 64), rel_tol=1e-4)  # the exported (fused) model is the source
    assert all(r["perplexity"] > 1 for r in rows)
    result = runner.invoke(app, ["run", str(ck), "-p", "The cache stores key 12 and value 84 in", "-n", "12", "--greedy",
                                 "--no-chat", "--device", "cpu"])  # fmt: skip
    _ok(result)
