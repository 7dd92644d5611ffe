"""The passkey task's prompts, answer check and decoding paths on a tiny random model."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.evaluate.checkpoints import checkpoint_at_bits
from rkv_convert.evaluate.passkey import (
    NEEDLE,
    PasskeyOptions,
    _template_parts,
    answer_is_correct,
    build_trials,
    passkey_csv,
    run_passkey,
)
from rkv_convert.export.fuse import fuse_calibration
from rkv_convert.export.writer import checkpoint_from_artifact

TEMPLATE = ("{% for m in messages %}<eos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<eos>assistant: {% endif %}")
FILLER = " ".join(f"The method number {i} returns a list of names." for i in range(300))


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_trials_have_exact_length_and_the_key_at_its_depth(tokenizer) -> None:
    opts = PasskeyOptions(lengths=(300, 360), trials=4, depths=(0.1, 0.5, 0.9), max_new_tokens=6, batch_size=2)
    trials = build_trials(tokenizer, FILLER, opts)
    head, question = _template_parts(tokenizer)
    for length, rows in trials.items():
        assert [t.depth for t in rows] == [0.1, 0.5, 0.9, 0.1]
        for t in rows:
            assert t.context.numel() + t.question.numel() == length - opts.max_new_tokens
            assert t.question.tolist() == question and t.context[: len(head)].tolist() == head
            assert len(t.key) == 5 and t.key.isdigit()
            needle = tokenizer(NEEDLE.format(key=t.key), add_special_tokens=False)["input_ids"]
            budget = t.context.numel() - len(head) - len(needle)
            at = len(head) + round(t.depth * budget)
            assert t.context[at : at + len(needle)].tolist() == needle
    again = build_trials(tokenizer, FILLER, opts)
    other = build_trials(tokenizer, FILLER, dataclasses.replace(opts, seed=1))
    assert [t.key for t in again[300]] == [t.key for t in trials[300]]
    assert all(torch.equal(a.context, b.context) for a, b in zip(again[360], trials[360]))
    assert [t.key for t in other[300]] != [t.key for t in trials[300]]


def test_too_short_a_length_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="leaves no room for filler"):
        build_trials(tokenizer, FILLER, PasskeyOptions(lengths=(40,), trials=1, max_new_tokens=6))
    with pytest.raises(ValueError, match="exceed max_new_tokens"):
        PasskeyOptions(lengths=(8,), max_new_tokens=10)


def test_answer_check() -> None:
    assert answer_is_correct(" 46044.\n", "46044")
    assert answer_is_correct("46044", "46044")
    assert not answer_is_correct(" 460445", "46044")
    assert not answer_is_correct(" 4.\n 46044", "46044")
    assert not answer_is_correct(" the key", "46044")


@pytest.mark.parametrize("key_layout", ["folded", "prerope"])
def test_every_path_matches_full_precision_when_the_window_holds_everything(tokenizer, key_layout) -> None:
    """With a recent window longer than the prompt nothing is quantized: every path (the runtime's
    packed cache, the evaluation quantizers) must decode exactly what full precision decodes."""
    source = tiny_model("llama", n_kv=2)
    batches = torch.randint(0, 128, (2, 64))
    artifact = calibrate(source, batches, CalibrationOptions(num_samples=2, seqlen=64, batch_size=2, key_layout=key_layout))
    fuse_calibration(source, artifact)
    ck = checkpoint_from_artifact(artifact, 2, recent_window=512, flush_block=8, max_sinks=2)
    clips = {w: [layer[f"{w}_clip_by_bits"] for layer in artifact.layers] for w in ("key", "value")}
    opts = PasskeyOptions(lengths=(300,), trials=3, depths=(0.2, 0.8), max_new_tokens=5, batch_size=2)
    paths = ["fp", "rotatekv", "rotatekv-eval", "rtn", "kivi", "rotatekv-exported"]
    results = run_passkey(source, tokenizer, ck, lambda b: checkpoint_at_bits(ck, clips, b), paths, [2, 3], opts, FILLER,
                          backend="reference")  # fmt: skip
    assert [(r.path, r.bits) for r in results] == [("fp", 16), ("rotatekv", 2), ("rotatekv", 3), ("rotatekv-eval", 2),
                                                   ("rotatekv-eval", 3), ("rtn", 2), ("rtn", 3), ("kivi", 2), ("kivi", 3),
                                                   ("rotatekv-exported", 2)]  # the checkpoint as exported: once  # fmt: skip
    fp = results[0]
    assert len(fp.answers) == 3 and all(fp.answers)
    for r in results[1:]:
        assert r.answers == fp.answers, r.path

    # full precision = transformers' greedy generate on the whole prompt
    trials = build_trials(tokenizer, FILLER, opts)[300]
    ids = torch.stack([torch.cat([t.context, t.question]) for t in trials])
    with torch.no_grad():
        out = source.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    for answer, row in zip(fp.answers, out[:, ids.shape[1] :]):
        assert tokenizer.decode(row, skip_special_tokens=True).startswith(answer)

    text = passkey_csv(results)
    lines = text.strip().splitlines()
    assert lines[0].startswith("path,bits,length,trials,correct,accuracy,fp_accuracy,seconds,device,depth_0.2,depth_0.8")
    assert len(lines) == 11 and lines[1].startswith("fp,16,300,3,")


def test_quantized_paths_read_quantized_keys(tokenizer) -> None:
    """With no recent window the 2-bit paths no longer reproduce full precision's logits: the cache is read quantized."""
    source = tiny_model("llama", n_kv=2)
    artifact = calibrate(source, torch.randint(0, 128, (2, 64)), CalibrationOptions(num_samples=2, seqlen=64, batch_size=2))
    fuse_calibration(source, artifact)
    ck = checkpoint_from_artifact(artifact, 2, recent_window=0, flush_block=8, max_sinks=0)
    from rkv_convert.evaluate.passkey import _fp_step, _runtime_step
    from rkv_convert.runtime.cache import CacheSettings
    from rkv_convert.runtime.generate import RkvModel

    rkv = RkvModel(source, ck, tokenizer, CacheSettings.from_config(ck.config), "reference")
    ids = torch.randint(0, 128, (1, 80))
    with torch.no_grad():
        fp, rt = _fp_step(source)(), _runtime_step(rkv)()
        fp(ids), rt(ids)
        q = torch.randint(0, 128, (1, 6))
        a, b = fp(q), rt(q)
    assert not torch.allclose(a, b, atol=1e-3)
    assert rkv.last_cache.layers[0].n_quant > 0
