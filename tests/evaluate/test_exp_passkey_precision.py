"""``benchmarks/exp_passkey_precision.py`` (an issue-12 experiment): its variants change only the named side and
layers, and its ``exported`` variant scores what `rkv eval --task passkey`'s ``rotatekv-eval`` path scores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import tiny_model, tiny_tokenizer

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.evaluate.passkey import PasskeyOptions, build_trials, run_passkey, score_scheme
from rkv_convert.export.fuse import fuse_calibration
from rkv_convert.evaluate.schemes import Scheme
from rkv_convert.export.writer import checkpoint_from_artifact

TEMPLATE = ("{% for m in messages %}<eos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<eos>assistant: {% endif %}")
FILLER = " ".join(f"The method number {i} returns a list of names." for i in range(300))


@pytest.fixture(scope="module")
def exp():
    return load_benchmark("exp_passkey_precision")


@pytest.fixture(scope="module")
def setup():
    source = tiny_model("llama", n_kv=2)
    artifact = calibrate(source, torch.randint(0, 128, (2, 64)), CalibrationOptions(num_samples=2, seqlen=64, batch_size=2))
    fuse_calibration(source, artifact)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return source, tok, checkpoint_from_artifact(artifact, 2, recent_window=16, flush_block=8, max_sinks=1)


def test_variants_raise_only_the_named_side_and_layers(exp, setup) -> None:
    _, _, ck = setup
    exported = exp.variant_scheme(ck, "exported")
    one = exp.variant_scheme(ck, "keys8@1")
    assert [c.bits for c in one.key_codecs] == [2, 8] and one.key_codecs[1].clip == 1.0
    assert one.key_codecs[1].meta_base is None and one.key_codecs[0] == exported.key_codecs[0]
    assert one.value_codecs == exported.value_codecs
    both = exp.variant_scheme(ck, "both8")
    assert [c.bits for c in both.key_codecs + both.value_codecs] == [8, 8, 8, 8]
    assert [c.bits for c in exp.variant_scheme(ck, "values8@0").value_codecs] == [8, 2]
    with pytest.raises(ValueError, match="unknown variant"):
        exp.variant_scheme(ck, "keys4")
    with pytest.raises(ValueError, match="outside 0..1"):
        exp.variant_scheme(ck, "keys8@2")


def test_exported_variant_scores_like_the_eval_quantizer_path(exp, setup) -> None:
    source, tok, ck = setup
    opts = PasskeyOptions(lengths=(300,), trials=3, depths=(0.3, 0.7), max_new_tokens=4, batch_size=2)
    path = run_passkey(source, tok, ck, lambda b: ck, ["rotatekv-eval"], [2], opts, FILLER)[0]
    ours = score_scheme(source, tok, ck, exp.variant_scheme(ck, "exported"), "exported",
                        build_trials(tok, FILLER, opts)[300], opts)  # fmt: skip
    assert len(ours.answers) == 3 and all(ours.answers)
    assert ours.answers == path.answers and ours.correct == path.correct


def test_search_variants_swap_only_the_named_side_for_the_searched_encoder(exp, setup) -> None:
    _, _, ck = setup
    exported = exp.variant_scheme(ck, "exported")
    keys = exp.variant_scheme(ck, "search-keys", (1.0, 0.7))
    assert all(type(c).__name__ == "SearchedKeys" and c.fractions == (1.0, 0.7) for c in keys.key_codecs)
    assert keys.value_codecs == exported.value_codecs
    both = exp.variant_scheme(ck, "search-both")
    assert all(type(c).__name__ == "SearchedValues" and c.fractions == exp.GRID for c in both.value_codecs)
    assert [c.bits for c in both.key_codecs] == [c.bits for c in exported.key_codecs]
    k = torch.randn(1, 2, 5, ck.config.head_dim)
    cos, sin = torch.ones(1, 5, ck.config.head_dim), torch.zeros(1, 5, ck.config.head_dim)
    codec, plain = keys.key_codecs[0], exported.key_codecs[0]
    err = (codec.decode(codec.encode(k, cos, sin), cos, sin) - k).square().sum()
    err_plain = (plain.decode(plain.encode(k, cos, sin), cos, sin) - k).square().sum()
    assert err < err_plain  # the search keeps each group's best range, the plain one among its candidates
    with pytest.raises(ValueError, match="needs a folded-key checkpoint"):
        exp.variant_scheme(dataclasses.replace(ck, config=dataclasses.replace(ck.config, key_layout="prerope")),
                           "search-both")


def test_needle_kept_reads_its_spans_in_full_precision(exp, setup, monkeypatch) -> None:
    """The needle is found where ``build_trials`` put it; its span reads back in full precision; spans over the
    whole prompt answer as the full-precision scheme does, empty spans as the exported one."""
    source, tok, ck = setup
    opts = PasskeyOptions(lengths=(300,), trials=4, depths=(0.3, 0.7), max_new_tokens=4, batch_size=2)
    trials = build_trials(tok, FILLER, opts)[300]
    for (a, b), t in zip(exp.needle_spans(tok, trials, opts), trials):
        assert tok.decode(t.context[a:b]).strip().startswith(f"The pass key is {t.key}")
    kept = exp.variant_scheme(ck, "needle-both")
    k = torch.randn(2, ck.config.num_key_value_heads, 6, ck.config.head_dim)
    cos, sin = torch.ones(1, 6, ck.config.head_dim), torch.zeros(1, 6, ck.config.head_dim)
    kept.spans = [(1, 3), (0, 0)]
    got, quantized = kept.keys(0, k, cos, sin), kept.base.keys(0, k, cos, sin)
    assert torch.equal(got[0, :, 1:3], k[0, :, 1:3]) and not torch.equal(quantized[0, :, 1:3], k[0, :, 1:3])
    assert torch.equal(got[0, :, 3:], quantized[0, :, 3:]) and torch.equal(got[1], quantized[1])
    assert torch.equal(kept.values(0, k)[0, :, 1:3], k[0, :, 1:3])

    fp = score_scheme(source, tok, ck, Scheme(), "fp", trials, opts)
    exported = score_scheme(source, tok, ck, kept.base, "exported", trials, opts)
    assert fp.answers != exported.answers  # the check below can tell them apart
    monkeypatch.setattr(exp, "needle_spans", lambda *_: [(0, 10_000)] * len(trials))
    whole = exp.score_needle_kept(source, tok, ck, exp.NeedleKept(base=kept.base), "all", trials, opts)
    assert whole.answers == fp.answers
    none = exp.NeedleKept(base=kept.base, keep_keys=False, keep_values=False)
    assert exp.score_needle_kept(source, tok, ck, none, "none", trials, opts).answers == exported.answers


def test_salient_variant_runs_the_checkpoint_with_salient_tokens(exp, setup) -> None:
    """``salient-N`` is the exported scheme on the checkpoint with ``salient_tokens = N``; it keeps tokens the plain
    one quantizes, so its answers differ."""
    source, tok, ck = setup
    assert exp.variant_checkpoint(ck, "salient-8").config.salient_tokens == 8
    assert exp.variant_checkpoint(ck, "exported") is ck
    assert exp.variant_scheme(ck, "salient-8") == exp.variant_scheme(ck, "exported")
    opts = PasskeyOptions(lengths=(300,), trials=4, depths=(0.3, 0.7), max_new_tokens=4, batch_size=2)
    trials = build_trials(tok, FILLER, opts)[300]
    plain = score_scheme(source, tok, ck, exp.variant_scheme(ck, "exported"), "exported", trials, opts)
    many = score_scheme(source, tok, exp.variant_checkpoint(ck, "salient-200"), exp.variant_scheme(ck, "salient-200"),
                        "salient-200", trials, opts)  # fmt: skip
    assert many.answers != plain.answers
    with pytest.raises(ValueError, match="unknown variant"):
        exp.variant_scheme(ck, "salient-x")
