"""Experiment (issue 12): which layers get 3-bit keys, from calibration statistics instead of an NLL sweep.

``exp_int8_group_meta.py`` spends the quarter bit that 8-bit group metadata frees on 3-bit keys in half
of the layers, chosen by a keys-only NLL sensitivity sweep on development text (31 forward runs, 243 s
on a 2-core CPU). This script computes, per layer and from calibration text only (``pydoc``, the
calibrator's windows: seed 0, 512 tokens), cheap proxies of the gain of 3-bit over 2-bit keys, each
``proxy(2 bits) - proxy(3 bits)`` with each width's searched clip in the 8-bit-metadata store
(``Setup.scheme(..., meta8=True)`` of the experiment above). Sink tokens are treated as the sweep's
``sinks`` protocol does: excluded from key rows, kept full precision in attention.

- ``qk_diag`` (a): the calibrator's clip-search objective (``search.clip_error`` with ``weight``): the
  key error in the centred post-RoPE space weighted per channel by ``search.rope_pair_weights`` of the
  layer's mean query energy, i.e. the expected squared attention logit error (up to a constant d²);
- ``qk_diag_rel`` (b): (a) over the same weighted energy of the centred keys;
- ``mse_rel``: plain relative squared error of the keys (no queries), as a baseline;
- ``qk_full`` (c): ``e^T Σ_q e / d`` with the full query second moment per KV head (summed over its
  query heads): the expected squared logit error at the softmax temperature 1/sqrt(d), no diagonal
  approximation (SmolLM2 has one d, so 1/sqrt(d) alone cannot reorder layers);
- ``attn_kl``: mean over queries and heads of KL(p || p̂) of the causal attention rows, keys read
  back quantized (sinks full precision): logit errors where the softmax puts its mass;
- ``out_rel``: ``||W_o Δo||² / ||h||²``, the attention output error the quantized keys cause,
  through ``o_proj``, against the residual stream it is added to;
- ``fisher``: ``Σ_t (g_t · Δo_t)²`` with ``g`` the gradient of the mean NLL of the calibration
  window with respect to the attention output (one backward pass): an empirical-Fisher estimate of
  the NLL increase;
- ``first_order``: ``Σ_t g_t · Δo_t`` (signed; first-order NLL change).

(a), (b), ``mse_rel`` and ``qk_full`` use only what ``rkv calibrate`` already holds (key rows, query
second moments, rotation, clips; ``qk_full`` needs the d × d query moment instead of its diagonal);
``attn_kl`` and ``out_rel`` need the attention rows of a few calibration windows in its third pass;
``fisher`` needs one backward pass.

Each proxy's top ``--budget`` layers (default half) are compared with the NLL-chosen set (overlap,
Spearman correlation of the per-layer gains with the sweep's, sum of the sweep's gains captured).
``--sweep`` reruns the keys-only NLL sweep on the proxy windows (a replicate: how reproducible the
sweep itself is). ``--score`` scores chosen sets on WikiText-2 test windows with
``evaluate.perplexity`` (one-shot and deployed) against the NLL set and full precision.

Findings on /tmp/exp8/ck (SmolLM2-135M, default folded checkpoint; benchmarks/results/exp_key_bits_proxy.csv):
no proxy reproduces the NLL set (overlaps 3-11 of 15), but neither does the sweep itself: rerun on the
4 x 512 calibration windows it correlates 0.08 (Spearman) with the dev sweep and shares 5 of 15
layers. On WikiText-2 test (8 x 1024) every set that raises mostly middle and late layers scores
within a few percent of the NLL set (one-shot 1.40-1.46x, deployed 1.035-1.040x, NLL set 1.421x /
1.036x; ``qk_diag`` 1.458x / 1.035x, ``fisher`` 1.399x / 1.040x, layers 15-29 1.415x / 1.036x);
the early-layer set of ``out_rel`` loses (1.613x / 1.056x). ``qk_diag``'s set is the same at 4, 8
and 32 windows, two seeds and fp16 or 8-bit metadata; ``fisher``'s moves by 3-4 layers.

    OMP_NUM_THREADS=1 python benchmarks/exp_key_bits_proxy.py /tmp/exp8/ck \\
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8 --proxy-windows 32 \\
        --score nll,qk_diag,fisher --csv benchmarks/results/exp_key_bits_proxy.csv
    OMP_NUM_THREADS=1 python benchmarks/exp_key_bits_proxy.py /tmp/exp8/ck \\
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8 --sweep \\
        --score nll_replicate,out_rel,late15 --sets late15=15,16,17,18,19,20,21,22,23,24,25,26,27,28,29 \\
        --csv benchmarks/results/exp_key_bits_proxy.csv
    OMP_NUM_THREADS=1 python benchmarks/exp_key_bits_proxy.py /tmp/exp8/ck \\
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --proxy-meta fp16 \\
        --csv benchmarks/results/exp_key_bits_proxy.csv
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import append_csv, print_table  # noqa: E402
from _experiment import experiment_parser  # noqa: E402
from exp_int8_group_meta import Setup, calibrate_meta, key_sensitivity  # noqa: E402

from rkv_convert.calibrate.run import _query_energy  # noqa: E402
from rkv_convert.calibrate.search import rope_pair_weights  # noqa: E402
from rkv_convert.calibration_data.sources import load_text, sample_batches  # noqa: E402
from rkv_convert.evaluate.checkpoints import clip_tables  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402
from rkv_convert.models.adapters import attach, stock_attention  # noqa: E402
from rkv_convert.quant.sinks import detect_sinks  # noqa: E402
from rkv_convert.runtime.ops import apply_rope  # noqa: E402

# The keys-only NLL sweep of exp_int8_group_meta.py on /tmp/exp8/ck (benchmarks/results/exp_int8_group_meta.log):
# dev NLL gain of 3-bit keys in one layer, all else at 2 bits, 8-bit metadata, sinks protocol,
# last 4 x 512 pydoc tokens.
NLL_GAINS = [0.00866, 0.02348, 0.02529, 0.00159, -0.01827, 0.01080, 0.01252, 0.01173, 0.00944, -0.02086,
             0.00479, 0.00460, 0.01104, -0.00271, -0.00102, 0.00121, 0.00379, 0.01732, 0.01293, 0.01666,
             0.02163, 0.00525, 0.01056, 0.00682, 0.00827, 0.00124, 0.00233, -0.00104, 0.00336, 0.00029]  # fmt: skip
NLL_SET = [2, 1, 20, 17, 19, 18, 6, 7, 12, 5, 22, 8, 0, 24, 23]  # allocate_bits on NLL_GAINS, by gain
PROXIES = ("qk_diag", "qk_diag_rel", "mse_rel", "qk_full", "attn_kl", "out_rel", "fisher", "first_order")
WIDTHS = (2, 3)


class _Capture:
    """FP attention handler that keeps each layer's inputs and adds a zero leaf to its output (for its gradient)."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        out = stock_attention(module, query, key, value, position_embeddings, attention_mask, cache, **kw)
        delta = torch.zeros_like(out, requires_grad=True)
        cos, sin = position_embeddings
        self.layers[module.layer_idx] = {
            "q_pre": query.detach(), "k_pre": key.detach(), "v": value.detach(), "h": layer_input.detach(),
            "cos": cos.detach(), "sin": sin.detach(), "delta": delta, "w_o": module.o_proj.weight.detach(),
            "scale": module.scaling,
        }  # fmt: skip
        return out + delta


def _attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention probabilities ``[B, n_q, T, T]`` fp32 (GQA: query head j reads KV head j // rep)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    t = s.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)


def _add(acc: dict[str, object], key: str, value) -> None:
    acc[key] = acc[key] + value if key in acc else value


def layer_stats(setup: Setup, schemes: dict[int, object], layer: int, cap: dict[str, torch.Tensor],
                grad: torch.Tensor, acc: dict[str, object]) -> None:  # fmt: skip
    """Add one window's sums for every proxy of ``layer`` to ``acc`` (per width: keys ``f"{name}@{bits}"``)."""
    cfg, lay = setup.ck.config, setup.ck.layers[layer]
    d, n_kv = cfg.head_dim, cfg.num_key_value_heads
    cos, sin = cap["cos"], cap["sin"]
    q = apply_rope(cap["q_pre"].float(), cos.unsqueeze(1), sin.unsqueeze(1))  # [B, n_q, T, d] post-RoPE
    k = apply_rope(cap["k_pre"].float(), cos.unsqueeze(1), sin.unsqueeze(1))
    v, h, scale = cap["v"].float(), cap["h"].float(), cap["scale"]
    b, n_q, t, _ = q.shape
    rep = n_q // n_kv
    # key rows as the calibrator samples them: tokens whose sink channels stay under the threshold
    flat_h = h.reshape(-1, h.shape[-1])
    keep = torch.ones(flat_h.shape[0], dtype=torch.bool)
    if lay.sink_channels.numel():
        keep = flat_h[:, lay.sink_channels].abs().amax(-1) <= float(lay.sink_threshold)
    mean_rope = schemes[2].key_codecs[layer]._mean_rope(cos, sin, k.device)  # RoPE_n(mu) [B, n_kv, T, d]
    kc = (k - mean_rope).transpose(1, 2).reshape(-1, n_kv * d)[keep]  # centred post-RoPE key rows
    acc["n_q"] = n_q
    _add(acc, "tokens_q", b * t)
    _add(acc, "rows", int(keep.sum()))
    _add(acc, "q_energy", _query_energy(cap["q_pre"], n_kv))  # what rkv calibrate accumulates for the qk clips
    qh = q.reshape(b, n_kv, rep, t, d)
    _add(acc, "q_moment", torch.einsum("bhrtd,bhrte->hde", qh, qh).double())  # [n_kv, d, d]: the full second moment
    _add(acc, "key_sq", kc.double().pow(2).sum(0))  # per channel
    _add(acc, "res_sq", h.pow(2).sum().item())
    sinks = detect_sinks(cap["h"], lay.sink_channels, float(lay.sink_threshold), cfg.max_sinks)  # [B, T]
    p = _attention(q, k, scale)
    v_rep = v.repeat_interleave(rep, dim=1)
    o = p @ v_rep
    w_o = cap["w_o"].float()
    for bits in WIDTHS:
        khat = schemes[bits].key_codecs[layer].roundtrip(cap["k_pre"].float(), cos, sin).float()
        e = (khat - k).transpose(1, 2).reshape(-1, n_kv * d)[keep].double()
        _add(acc, f"err_sq@{bits}", e.pow(2).sum(0))
        eh = e.reshape(-1, n_kv, d)
        _add(acc, f"err_moment@{bits}", torch.einsum("nhd,nhe->hde", eh, eh))
        khat = torch.where(sinks[:, None, :, None], k, khat)  # sinks protocol: sink keys full precision
        ph = _attention(q, khat, scale)
        kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log(ph.clamp_min(1e-30)))).sum(-1)  # [B, n_q, T]
        _add(acc, f"attn_kl@{bits}", kl.sum().item())
        do = (ph @ v_rep - o).transpose(1, 2).reshape(b, t, -1)  # [B, T, n_q*d], what o_proj receives
        _add(acc, f"out_sq@{bits}", (do @ w_o.T).pow(2).sum().item())
        gd = (grad.float() * do).sum(-1)  # [B, T]
        _add(acc, f"fisher@{bits}", gd.pow(2).sum().item())
        _add(acc, f"first_order@{bits}", gd.sum().item())


def finish(setup: Setup, acc: dict[str, object]) -> dict[str, dict[int, float]]:
    """Each proxy of one layer at each width, from its sums (means over key rows, tokens, query heads)."""
    d = setup.ck.config.head_dim
    rows, tq = acc["rows"], acc["tokens_q"]
    w = rope_pair_weights((acc["q_energy"] / tq).float(), d).double()  # as rkv calibrate's qk clip objective
    key_w = float((acc["key_sq"] * w).sum()) / rows
    key_e = float(acc["key_sq"].sum()) / rows
    q_moment = acc["q_moment"] / tq  # per KV head, summed over its query heads: E[q q^T]
    out: dict[str, dict[int, float]] = {name: {} for name in PROXIES}
    for bits in WIDTHS:
        err = acc[f"err_sq@{bits}"]
        out["qk_diag"][bits] = float((err * w).sum()) / rows / err.numel()  # search.clip_error(weight=w)
        out["qk_diag_rel"][bits] = float((err * w).sum()) / rows / key_w
        out["mse_rel"][bits] = float(err.sum()) / rows / key_e
        # E[(q . e)^2] / d: squared logit error at the softmax temperature 1/sqrt(d), summed over heads
        out["qk_full"][bits] = float((q_moment * acc[f"err_moment@{bits}"]).sum()) / rows / d
        out["attn_kl"][bits] = acc[f"attn_kl@{bits}"] / (tq * acc["n_q"])  # per query row and head
        out["out_rel"][bits] = acc[f"out_sq@{bits}"] / acc["res_sq"]
        out["fisher"][bits] = acc[f"fisher@{bits}"]
        out["first_order"][bits] = acc[f"first_order@{bits}"]
    return out


def compute_proxies(model, setup: Setup, cal: torch.Tensor, meta8: bool = True) -> list[dict[str, dict[int, float]]]:
    """Per layer, each proxy at 2 and 3 bits, from the calibration windows ``cal`` (one forward + backward each);
    keys in the 8-bit-metadata store, or with ``meta8=False`` the fp16 one (what rkv calibrate's clip search sees)."""
    n = setup.ck.config.num_layers
    schemes = {bits: setup.scheme([bits] * n, meta8) for bits in WIDTHS}
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    accs: list[dict[str, object]] = [{} for _ in range(n)]
    for row in cal:
        ids = row[None]
        cap = _Capture()
        with torch.enable_grad(), attach(model, cap):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            logits = head(hidden).float()
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
            loss.backward()
        with torch.no_grad():
            for i in range(n):
                layer_stats(setup, schemes, i, cap.layers[i], cap.layers[i]["delta"].grad, accs[i])
    return [finish(setup, a) for a in accs]


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = experiment_parser(__doc__.split("\n")[0])
    p.add_argument("--cal-windows", type=int, default=4,
                   help="pydoc windows (seed 0, 512 tokens) for the 8-bit scale bases")
    p.add_argument("--proxy-windows", type=int, default=4, help="pydoc windows (512 tokens) for the proxies")
    p.add_argument("--proxy-seed", type=int, default=0, help="their seed (0: the same windows as the bases)")
    p.add_argument("--proxy-meta", choices=("8bit", "fp16"), default="8bit", help="group metadata of the proxies' keys")
    p.add_argument("--sweep", action="store_true",
                   help="also rerun the keys-only NLL sweep on the proxy windows: a replicate of the dev sweep")
    p.add_argument("--budget", type=int, default=None, help="layers raised to 3-bit keys (default: half)")
    p.add_argument("--score", default="", help="comma list of sets to score on --text: nll, proxy names, --sets names")
    p.add_argument("--sets", default="", help="more layer sets to score: NAME=i,j,k separated by ';'")
    args = p.parse_args()
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    ck = read_checkpoint(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    n = ck.config.num_layers
    budget = args.budget or n // 2
    setup = Setup(ck, clip_tables(args.checkpoint, n), [], [])
    cal = sample_batches(load_text("pydoc"), tok, args.cal_windows, 512, 0)
    calibrate_meta(model, setup, cal)  # the 8-bit scale bases, as the experiment sets them
    log(f"8-bit metadata bases set on {args.cal_windows} x 512 pydoc tokens")

    windows = cal if (args.proxy_windows, args.proxy_seed) == (args.cal_windows, 0) else \
        sample_batches(load_text("pydoc"), tok, args.proxy_windows, 512, args.proxy_seed)  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    per_layer = compute_proxies(model, setup, windows, args.proxy_meta == "8bit")
    proxy_wall, proxy_cpu = time.perf_counter() - t0, time.process_time() - c0
    log(f"proxies on {args.proxy_windows} x 512 pydoc tokens (seed {args.proxy_seed}): {proxy_wall:.1f} s wall, "
        f"{proxy_cpu:.1f} s CPU")  # fmt: skip
    gains_by = {name: [layer[name][2] - layer[name][3] for layer in per_layer] for name in PROXIES}
    names = list(PROXIES)
    if args.sweep:
        t0 = time.perf_counter()
        sens = key_sensitivity(model, setup, windows, log)
        gains_by["nll_replicate"] = list(sens.key_gain)
        names.append("nll_replicate")
        log(f"NLL sweep on the proxy windows: {time.perf_counter() - t0:.0f} s; base NLL {sens.base_nll:.4f}")

    common = {"cal_windows": args.cal_windows, "proxy_windows": args.proxy_windows, "proxy_seed": args.proxy_seed,
              "proxy_meta": args.proxy_meta, "budget": budget}  # fmt: skip
    sets: dict[str, list[int]] = {"nll": NLL_SET}
    summary = []
    for name in names:
        gains = gains_by[name]
        chosen = sorted(range(n), key=lambda i: -gains[i])[:budget]
        sets[name] = chosen
        overlap = len(set(chosen) & set(NLL_SET))
        captured = sum(NLL_GAINS[i] for i in chosen) / sum(NLL_GAINS[i] for i in NLL_SET)
        rho = spearman(gains, NLL_GAINS)
        summary.append({"proxy": name, "overlap": overlap, "spearman": rho, "dev_gain_captured": captured,
                        "chosen": " ".join(f"k{i}" for i in chosen)})  # fmt: skip
        if args.csv:
            for i, layer in enumerate(per_layer):
                append_csv(args.csv, {"kind": "layer", "set": name, "layer": i,
                                      "value_2b": layer[name][2] if name in PROXIES else "",
                                      "value_3b": layer[name][3] if name in PROXIES else "", "gain": gains[i],
                                      "nll_gain": NLL_GAINS[i],
                                      "chosen": "", "overlap_nll": "", "spearman_nll": "", "dev_gain_captured": "",
                                      "protocol": "", "windows": "", "length": "", "ppl": "", "x_fp": "",
                                      "fp_ppl": "", "bits_per_elem": "", "seconds": proxy_wall,
                                      "cpu_seconds": proxy_cpu, **common})  # fmt: skip
            append_csv(args.csv, {"kind": "set", "set": name, "layer": "", "value_2b": "", "value_3b": "", "gain": "",
                                  "nll_gain": "", "chosen": " ".join(map(str, sorted(chosen))), "overlap_nll": overlap,
                                  "spearman_nll": rho, "dev_gain_captured": captured, "protocol": "", "windows": "",
                                  "length": "", "ppl": "", "x_fp": "", "fp_ppl": "", "bits_per_elem": "",
                                  "seconds": proxy_wall, "cpu_seconds": proxy_cpu, **common})  # fmt: skip
    print_table(f"3-bit key layers (top {budget}) per proxy against the NLL sweep's "
                f"({' '.join(f'k{i}' for i in NLL_SET)})", summary)  # fmt: skip
    per = [{"layer": i, "nll_gain": NLL_GAINS[i], **{k: gains_by[k][i] for k in names}} for i in range(n)]
    print_table("per-layer gains (2-bit minus 3-bit)", per)

    for spec in filter(None, args.sets.split(";")):
        label, layers = spec.split("=")
        sets[label] = [int(x) for x in layers.split(",")]
    score = [s for s in args.score.split(",") if s]
    if not score:
        log(f"done: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU")
        return
    ids = token_windows(tok, args.text.read_text(encoding="utf-8"), args.length, args.windows)
    fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck)
    log(f"FP {fp.perplexity:.3f} ({fp.seconds:.0f} s)")
    rows, scored = [], {}
    for protocol in args.protocols.split(","):
        for name in score:
            key3 = sorted(sets[name])
            label = "+".join(s for s in score if sorted(sets[s]) == key3)
            if (tuple(key3), protocol) in scored:
                continue
            scored[(tuple(key3), protocol)] = True
            scheme = setup.scheme([3 if i in key3 else 2 for i in range(n)], True)
            r = perplexity(model, ids, scheme, protocol, ck)
            kb, vb = scheme.bits_per_element()
            row = {"set": label, "protocol": protocol, "ppl": r.perplexity, "x_fp": r.perplexity / fp.perplexity,
                   "bits_per_elem": (kb + vb) / 2, "seconds": r.seconds,
                   "chosen": " ".join(map(str, key3))}  # fmt: skip
            rows.append(row)
            log(f"{label} / {protocol}: {r.perplexity:.3f} ({r.perplexity / fp.perplexity:.3f}x FP, {r.seconds:.0f} s)")
            if args.csv:
                append_csv(args.csv, {"kind": "ppl", "set": label, "layer": "", "value_2b": "", "value_3b": "",
                                      "gain": "", "nll_gain": "", "chosen": row["chosen"],
                                      "overlap_nll": len(set(key3) & set(NLL_SET)), "spearman_nll": "",
                                      "dev_gain_captured": "", "protocol": protocol, "windows": args.windows,
                                      "length": args.length, "ppl": r.perplexity, "x_fp": row["x_fp"],
                                      "fp_ppl": fp.perplexity, "bits_per_elem": row["bits_per_elem"],
                                      "seconds": r.seconds, "cpu_seconds": r.cpu_seconds, **common})  # fmt: skip
    print_table("8-bit metadata, K3 in the chosen layers, V2 (WikiText-2 test)", rows,
                ["set", "protocol", "bits_per_elem", "ppl", "x_fp", "seconds", "chosen"])  # fmt: skip
    log(f"done: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU")


if __name__ == "__main__":
    main()
