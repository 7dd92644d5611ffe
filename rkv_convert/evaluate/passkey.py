"""``rkv eval --task passkey``: can the model still find a number hidden in a long context?

Synthetic and offline. Each trial hides a seeded random 5-digit pass key at a chosen depth in
filler text cut from Python's own documentation (``pydoc``, the built-in calibration source, never
an evaluation text), asks for it through the model's chat template, and decodes greedily. The
prompt has exactly ``length - max_new_tokens`` tokens, so every trial of a length batches without
padding and the answer fits the model's context.

A trial's prompt is its *context* (intro, filler, pass key, filler) and its *question* (question, end of
the user turn, the assistant's ``The pass key is``), fed in one piece as a request arrives. Paths:

- ``fp``: the model with transformers' own cache;
- ``rtn``, ``kivi``, ``rotatekv-eval``: the evaluation's quantizers (:mod:`.schemes`) in the
  ``deployed`` protocol of :mod:`.perplexity` (every query, prompt included, reads keys and values
  older than the recent window quantized, sinks in full precision for the schemes that keep them),
  each step attending only the new tokens over the kept full-precision history (:mod:`.scheme_decode`);
- ``rotatekv``: the real packed cache (:class:`~rkv_convert.runtime.generate.RkvModel`): the prompt
  is prefilled (the model's own attention, then stored packed, with the checkpoint's salient tokens kept),
  and every answer token is a decode step of the runtime's kernels;
- ``rotatekv-exported``: the same packed cache with the checkpoint as exported (its per-layer key and value
  widths and group metadata, e.g. ``rkv export --group-meta log8 --key-bits ...``), run once and labelled
  with the checkpoint's ``bits``; ``rotatekv`` runs every layer at each ``--bits`` instead.

A trial is correct when the first number in the answer equals the pass key.
"""

from __future__ import annotations

import csv
import io
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..export.format import Checkpoint
from ..models.adapters import attach
from ..models.compat import cache_argument
from .scheme_decode import SchemeDecodeAttention
from .schemes import Scheme, build_scheme

__all__ = [
    "PasskeyOptions",
    "PasskeyTrial",
    "PasskeyResult",
    "PASSKEY_PATHS",
    "build_trials",
    "answer_is_correct",
    "run_passkey",
    "score_scheme",
    "passkey_csv",
    "device_name",
]

PASSKEY_PATHS = ("fp", "rtn", "kivi", "rotatekv", "rotatekv-eval", "rotatekv-exported")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"
_MARK = "\u2063RKV-PASSKEY-CONTEXT\u2063"  # placeholder for the context inside the chat template
_NUMBER = re.compile(r"\d+")
Log = Callable[[str], None]


@dataclass(frozen=True)
class PasskeyOptions:
    """What to run: prompt lengths (tokens, answer included), trials per length, depths, seed."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    trials: int = 50
    depths: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    seed: int = 0
    max_new_tokens: int = 10
    batch_size: int = 10

    def __post_init__(self) -> None:
        if self.trials < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("trials, batch_size and max_new_tokens must be >= 1")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")
        if not self.lengths or min(self.lengths) <= self.max_new_tokens:
            raise ValueError(f"every length must exceed max_new_tokens ({self.max_new_tokens}), got {self.lengths}")


@dataclass
class PasskeyTrial:
    """One prompt: ``context`` and ``question`` token ids (their sum is ``length - max_new_tokens``)."""

    length: int
    depth: float
    key: str
    context: torch.Tensor  # int64 [n_context]
    question: torch.Tensor  # int64 [n_question]


@dataclass
class PasskeyResult:
    """Accuracy of one path at one bit width and length; ``answers`` are the decoded texts."""

    path: str
    bits: int
    length: int
    trials: int
    correct: int
    by_depth: dict[str, float]
    seconds: float
    device: str
    answers: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def device_name(device: torch.device) -> str:
    """Where a figure ran, in words (the GPU's name, or the CPU and its core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _template_parts(tokenizer: object) -> tuple[list[int], list[int]]:
    """Token ids before and after the context in the chat-templated prompt (answer prefix included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the passkey task needs the model's chat template; this tokenizer has none")
    text = tokenizer.apply_chat_template([{"role": "user", "content": INTRO + _MARK + QUESTION}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    head, sep, tail = text.partition(_MARK)
    if not sep:
        raise ValueError("the chat template dropped the user's message; cannot place the context")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(head), encode(tail + ANSWER_PREFIX)


def build_trials(tokenizer: object, filler: str, options: PasskeyOptions) -> dict[int, list[PasskeyTrial]]:
    """Seeded trials per length: depths cycle through ``options.depths``; filler from a random offset."""
    head, question = _template_parts(tokenizer)
    stream = torch.tensor(tokenizer(filler, add_special_tokens=False)["input_ids"], dtype=torch.long)
    gen = torch.Generator().manual_seed(options.seed)
    trials: dict[int, list[PasskeyTrial]] = {}
    for length in options.lengths:
        rows = []
        for i in range(options.trials):
            key = str(int(torch.randint(10_000, 100_000, (1,), generator=gen)))
            needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
            budget = length - options.max_new_tokens - len(head) - len(needle) - len(question)
            if budget < 1:
                raise ValueError(f"passkey length {length} leaves no room for filler (the prompt's fixed part is "
                                 f"{length - budget} tokens); use a longer length")
            if stream.numel() <= budget:
                raise ValueError(f"the filler text has {stream.numel()} tokens, fewer than the {budget} a {length}-token trial needs")
            start = int(torch.randint(0, stream.numel() - budget, (1,), generator=gen))
            filler_ids = stream[start : start + budget]
            depth = options.depths[i % len(options.depths)]
            cut = round(depth * budget)
            context = torch.cat([torch.tensor(head), filler_ids[:cut], torch.tensor(needle), filler_ids[cut:]])
            rows.append(PasskeyTrial(length, depth, key, context.long(), torch.tensor(question, dtype=torch.long)))
        trials[length] = rows
    return trials


def answer_is_correct(answer: str, key: str) -> bool:
    """The first number in ``answer`` is exactly ``key``."""
    found = _NUMBER.search(answer)
    return found is not None and found.group() == key


def _finished(text: str) -> bool:
    """A whole number followed by something else: the answer cannot change any more."""
    return re.search(r"\d+\D", text) is not None


Step = Callable[[torch.Tensor], torch.Tensor]  # new token ids [B, n] → next-token logits [B, vocab]


def _greedy(start: Callable[[], Step], batch: list[PasskeyTrial], tokenizer: object, max_new_tokens: int,
            device: torch.device) -> list[str]:  # fmt: skip
    """Feed the prompt (context and question) in one piece, as a user's request arrives, then decode greedily;
    stop when every answer is complete."""
    step = start()
    logits = step(torch.stack([torch.cat([t.context, t.question]) for t in batch]).to(device))
    eos = tokenizer.eos_token_id
    tokens: list[torch.Tensor] = []
    texts = [""] * len(batch)
    for i in range(max_new_tokens):
        token = logits.argmax(-1)
        tokens.append(token.cpu())
        ids = torch.stack(tokens, 1)
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        done = [(eos is not None and bool((row == eos).any())) or _finished(t) for row, t in zip(ids, texts)]
        if all(done) or i + 1 == max_new_tokens:
            break
        logits = step(token[:, None].to(device))
    return texts


def _fp_step(model: torch.nn.Module) -> Callable[[], Step]:
    """Full precision, transformers' own cache."""
    from transformers import DynamicCache

    name = cache_argument(type(model).forward)

    def start() -> Step:
        cache = DynamicCache(config=model.config)

        def step(ids: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
            return out.logits[:, -1].float()

        return step

    return start


def _eval_step(model: torch.nn.Module, handler_factory: Callable[[], SchemeDecodeAttention]) -> Callable[[], Step]:
    """An evaluation quantizer, deployed protocol: each step feeds only the new tokens; the handler
    keeps the earlier keys and values (:mod:`.scheme_decode`)."""

    def start() -> Step:
        handler = handler_factory()
        seen = 0

        def step(ids: torch.Tensor) -> torch.Tensor:
            nonlocal seen
            positions = torch.arange(seen, seen + ids.shape[1], device=ids.device)[None]
            with attach(model, handler):
                out = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
            seen += ids.shape[1]
            return out.logits[:, -1].float()

        return step

    return start


def _runtime_step(rkv_model) -> Callable[[], Step]:
    """The packed rkv cache through :class:`RkvModel` (prefill, multi-token step, decode kernels)."""

    def start() -> Step:
        cache = rkv_model.new_cache()

        def step(ids: torch.Tensor) -> torch.Tensor:
            return rkv_model(ids, cache, logits_to_keep=1).logits[:, -1].float()

        return step

    return start


def _score(path: str, bits: int, trials: list[PasskeyTrial], start: Callable[[], Step], tokenizer: object,
           options: PasskeyOptions, device: torch.device) -> PasskeyResult:  # fmt: skip
    began = time.perf_counter()
    answers: list[str] = []
    with torch.no_grad():
        for s in range(0, len(trials), options.batch_size):
            answers += _greedy(start, trials[s : s + options.batch_size], tokenizer, options.max_new_tokens, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    hits = [answer_is_correct(a, t.key) for a, t in zip(answers, trials)]
    by_depth: dict[str, list[bool]] = {}
    for t, h in zip(trials, hits):
        by_depth.setdefault(f"{t.depth:g}", []).append(h)
    return PasskeyResult(path, bits, trials[0].length, len(trials), sum(hits),
                         {d: sum(v) / len(v) for d, v in sorted(by_depth.items())}, time.perf_counter() - began,
                         device_name(device), answers)  # fmt: skip


def run_passkey(
    model: torch.nn.Module,
    tokenizer: object,
    checkpoint: Checkpoint,
    checkpoint_at: Callable[[int], Checkpoint],
    paths: list[str],
    bits_list: list[int],
    options: PasskeyOptions,
    filler: str,
    backend: str = "auto",
    log: Log | None = None,
    done: list[PasskeyResult] | None = None,
    on_result: Callable[[list[PasskeyResult]], None] | None = None,
) -> list[PasskeyResult]:
    """Accuracy of every path (``fp`` once, the others at every width) at every length.

    ``model`` is the exported model (value rotation fused) on its device; ``checkpoint_at(b)``
    gives the checkpoint at ``b`` bits (:func:`~.checkpoints.checkpoint_at_bits`). Resuming: a
    path × bits × length already in ``done`` (an earlier run made the same way, see
    :mod:`.passkey_store`) is not run again; ``on_result`` gets every result so far (``done``
    first) after each new one, so a run cut short keeps what it finished.
    """
    from ..runtime.cache import CacheSettings
    from ..runtime.generate import RkvModel

    bad = [p for p in paths if p not in PASSKEY_PATHS]
    if bad:
        raise ValueError(f"unknown passkey path(s) {bad}; choose from {', '.join(PASSKEY_PATHS)}")
    device = next(model.parameters()).device
    trials = build_trials(tokenizer, filler, options)
    results = list(done or [])
    finished = {(r.path, r.bits, r.length) for r in results}
    for length, rows in trials.items():
        for path in paths:
            widths = [16] if path == "fp" else [checkpoint.config.bits] if path == "rotatekv-exported" else bits_list
            for bits in widths:
                if (path, bits, length) in finished:
                    if log:
                        log(f"passkey {path}-{bits} @ {length}: already done (resumed)")
                    continue
                if path == "fp":
                    start = _fp_step(model)
                elif path in ("rotatekv", "rotatekv-exported"):
                    ck = checkpoint if path == "rotatekv-exported" else checkpoint_at(bits)
                    start = _runtime_step(RkvModel(model, ck, tokenizer, CacheSettings.from_config(ck.config), backend))
                else:
                    ck = checkpoint_at(bits)
                    scheme = build_scheme("rotatekv" if path == "rotatekv-eval" else path, bits, ck)
                    start = _eval_start(model, scheme, ck)
                result = _score(path, bits, rows, start, tokenizer, options, device)
                results.append(result)
                if on_result:
                    on_result(results)
                if log:
                    log(f"passkey {path}-{bits} @ {length}: {result.correct}/{result.trials} in {result.seconds:.1f} s")
    return results


def _eval_start(model: torch.nn.Module, scheme: Scheme, checkpoint: Checkpoint) -> Callable[[], Step]:
    window = checkpoint.config.recent_window
    return _eval_step(model, lambda: SchemeDecodeAttention(scheme, checkpoint, window))


def score_scheme(model: torch.nn.Module, tokenizer: object, checkpoint: Checkpoint, scheme: Scheme, label: str,
                 trials: list[PasskeyTrial], options: PasskeyOptions) -> PasskeyResult:  # fmt: skip
    """Accuracy of one evaluation-quantizer ``scheme`` (any :class:`~.schemes.Scheme`, e.g. one an experiment
    built) on ``trials`` of one length, in the deployed protocol as the ``rotatekv-eval`` path runs it."""
    device = next(model.parameters()).device
    return _score(label, scheme.bits, trials, _eval_start(model, scheme, checkpoint), tokenizer, options, device)


CSV_FIELDS = ("path", "bits", "length", "trials", "correct", "accuracy", "fp_accuracy", "seconds", "device")


def passkey_csv(results: list[PasskeyResult]) -> str:
    """One line per path × bits × length, with FP's accuracy at that length beside it, then depths."""
    depths = sorted({d for r in results for d in r.by_depth}, key=float)
    fp = {r.length: r.accuracy for r in results if r.path == "fp"}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*CSV_FIELDS, *(f"depth_{d}" for d in depths)])
    for r in results:
        writer.writerow([r.path, r.bits, r.length, r.trials, r.correct, f"{r.accuracy:.4f}",
                         f"{fp[r.length]:.4f}" if r.length in fp else "", f"{r.seconds:.2f}", r.device,
                         *(f"{r.by_depth[d]:.4f}" if d in r.by_depth else "" for d in depths)])  # fmt: skip
    return out.getvalue()
