"""Experiment (issue 12): learned value rotations, one orthogonal matrix per layer and KV head.

The exported weights rotate every layer's values by the same ``H_d`` (``v_proj`` rows and ``o_proj``
columns, so attention is unchanged). Any orthogonal matrix per layer and KV head fuses the same way and
is free at decode and at cache writes alike. This learns ``R = cayley(A)`` on top of the exported
``H_d`` per layer and KV head, on ``pydoc`` calibration windows (never the evaluation text), for the
error the 2-bit values cause after ``o_proj``: ``mean |(Q(yR) - yR) Rᵀ M|²`` with ``M Mᵀ = Σ_j O_jᵀ O_j``
over the query heads ``j`` reading the KV head (``--objective oproj``), or plain squared error
(``--objective mse``; rotation-invariant, so only how well the groups quantize counts). Rounding passes
its gradient straight through, as the learned key rotations do (:mod:`rkv_convert.calibrate.rotation`).

Scores the exported checkpoint as exported and with the learned rotations fused (each layer's
``value_group_range`` re-measured on the calibration rows, as ``rkv calibrate`` measures it):

    python benchmarks/exp_value_rotation.py CK --text /dev/null --dev-windows 4 --protocols sinks,oneshot,deployed
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _experiment import experiment_parser  # noqa: E402
from _timing import print_table, report_row  # noqa: E402

from rkv_convert.calibrate.rotation import _surrogate, cayley  # noqa: E402
from rkv_convert.calibrate.run import _run_pass  # noqa: E402
from rkv_convert.calibration_data.sources import development_windows, load_text, sample_batches  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402
from rkv_convert.models.adapters import adapter_for, attention_modules  # noqa: E402
from rkv_convert.quant.quantizer import fake_quantize  # noqa: E402


def value_rows(model, batches: torch.Tensor, rows: int, seed: int) -> list[torch.Tensor]:
    """Per layer ``[rows, n_kv, d]`` value vectors (as the exported weights produce them), sampled uniformly."""
    found: dict[int, list[torch.Tensor]] = {}

    def observe(i: int, q, k, v: torch.Tensor, h) -> None:
        found.setdefault(i, []).append(v.float().permute(0, 2, 1, 3).reshape(-1, v.shape[1], v.shape[3]).cpu())

    _run_pass(model, batches, 4, observe, "values", None)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in sorted(found):
        x = torch.cat(found[i])
        out.append(x[torch.randperm(x.shape[0], generator=g)[:rows]])
    return out


def output_metric(attn, n_kv: int, d: int) -> torch.Tensor:
    """``[n_kv, d, d]``: per KV head a root ``M`` of ``Σ_j O_jᵀ O_j`` (query heads ``j`` of its group)."""
    o = attn.o_proj.weight.detach().float()
    n_q = o.shape[1] // d
    heads = o.reshape(o.shape[0], n_q, d).permute(1, 0, 2)  # [n_q, out, d]
    gram = torch.einsum("jod,joe->jde", heads, heads).reshape(n_kv, n_q // n_kv, d, d).sum(1)
    gram = gram / gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    return torch.linalg.cholesky(gram.double() + 1e-9 * torch.eye(d, dtype=torch.float64)).float()


def error(y: torch.Tensor, r: torch.Tensor, metric: torch.Tensor, bits: int, group: int, clip: float) -> float:
    z = y @ r
    return float((((fake_quantize(z, bits, group, clip) - z) @ r.T) @ metric).pow(2).sum(-1).mean())


def learn(y: torch.Tensor, metric: torch.Tensor, bits: int, group: int, clip: float, steps: int, lr: float):
    """``R`` orthogonal for rows ``y [N, d]``, starting from the identity; the best of the checkpoints by real error."""
    d = y.shape[1]
    eye = torch.eye(d)
    a = torch.zeros(d, d, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    before = error(y, eye, metric, bits, group, clip)
    best, best_err = eye, before
    for step in range(steps):
        r = cayley(a)
        z = y @ r
        loss = (((_surrogate(z, bits, group, clip) - z) @ r.T) @ metric).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 or step == steps - 1:
            with torch.no_grad():
                cand = cayley(a)
                err = error(y, cand, metric, bits, group, clip)
            if err < best_err:
                best, best_err = cand.detach().clone(), err
    return best, before, best_err


@torch.no_grad()
def fuse_head_rotations(model, rotations: list[torch.Tensor]) -> None:
    """Values times ``R_g`` per layer and KV head: ``v_proj`` rows ``R_gᵀ W_g``, ``o_proj`` columns ``O_j R_g``."""
    family = adapter_for(model.config)
    for attn, r in zip(attention_modules(model), rotations):
        n_kv, d, _ = r.shape
        proj, rows = family.value_rows(attn)
        w = proj.weight[rows].float().reshape(n_kv, d, -1)
        proj.weight[rows] = torch.einsum("gde,gdi->gei", r, w).reshape(-1, w.shape[-1]).to(proj.weight.dtype)
        if proj.bias is not None:
            b = proj.bias[rows].float().reshape(n_kv, d)
            proj.bias[rows] = torch.einsum("gd,gde->ge", b, r).reshape(-1).to(proj.bias.dtype)
        o = attn.o_proj.weight.float()
        n_q = o.shape[1] // d
        per = o.reshape(o.shape[0], n_kv, n_q // n_kv, d)
        attn.o_proj.weight.copy_(torch.einsum("ogjd,gde->ogje", per, r).reshape(o.shape).to(attn.o_proj.weight.dtype))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = experiment_parser(__doc__.split("\n")[0])
    p.add_argument("--objective", default="oproj,mse")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cal-windows", type=int, default=32)
    p.add_argument("--dev-windows", type=int, default=0)
    args = p.parse_args()
    ck = read_checkpoint(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    if args.dev_windows:
        ids = development_windows(load_text("pydoc"), tok, args.dev_windows, args.length)
    else:
        ids = token_windows(tok, args.text.read_text(encoding="utf-8"), args.length, args.windows)
    n_kv, d = ck.config.num_key_value_heads, ck.config.head_dim
    group = ck.config.value_group_size
    t0 = time.perf_counter()
    rows = value_rows(model, sample_batches(load_text("pydoc"), tok, args.cal_windows, 512, seed=0), args.rows, 0)
    print(f"value rows in {time.perf_counter() - t0:.0f} s", flush=True)
    fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck).perplexity
    variants = {"exported (H_d)": (model, ck)}
    for objective in args.objective.split(","):
        t0 = time.perf_counter()
        rotations, ratios = [], []
        for i, attn in enumerate(attention_modules(model)):
            metric = output_metric(attn, n_kv, d) if objective == "oproj" else torch.eye(d).expand(n_kv, d, d)
            bits, clip = ck.config.layer_bits(i)[1], ck.layers[i].value_clip
            heads = []
            for g in range(n_kv):
                r, before, after = learn(rows[i][:, g], metric[g], bits, group, clip, args.steps, args.lr)
                heads.append(r)
                ratios.append(after / before)
            rotations.append(torch.stack(heads))
        print(f"{objective}: learned in {time.perf_counter() - t0:.0f} s, error ratio "
              f"{min(ratios):.3f}-{max(ratios):.3f} (mean {sum(ratios) / len(ratios):.3f})", flush=True)
        m, c = copy.deepcopy(model), copy.deepcopy(ck)
        fuse_head_rotations(m, rotations)
        for i, r in enumerate(rotations):
            y = torch.einsum("ngd,gde->nge", rows[i], r).reshape(rows[i].shape[0], -1, group)
            if c.layers[i].value_group_range is not None:
                c.layers[i].value_group_range = float((y.amax(-1) - y.amin(-1)).max())
        fp_fused = perplexity(m, ids, build_scheme("fp", None, c), "oneshot", c).perplexity
        if abs(fp_fused / fp - 1) > 1e-4:
            raise SystemExit(f"fusing the learned value rotations moved full precision: {fp:.5f} -> {fp_fused:.5f}")
        variants[f"learned ({objective})"] = (m, c)
    out = []
    for protocol in args.protocols.split(","):
        for name, (m, c) in variants.items():
            t0 = time.perf_counter()
            r = perplexity(m, ids, build_scheme("rotatekv", None, c), protocol, c)
            row = {"values": name, "protocol": protocol, "text": "pydoc dev" if args.dev_windows else args.text.name,
                   "windows": ids.shape[0], "length": args.length, "ppl": r.perplexity, "x_fp": r.perplexity / fp,
                   "fp_ppl": fp, "seconds": time.perf_counter() - t0}  # fmt: skip
            out.append(row)
            report_row("learned value rotations", row, args.csv)
    print_table(f"learned value rotations ({args.checkpoint.name}, {ids.shape[0]} x {args.length})", out)


if __name__ == "__main__":
    main()
