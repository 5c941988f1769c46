"""`curdkv bench` and `curdkv analyze`: numbers against direct computations, JSON and CLI."""

from __future__ import annotations

import json

import pytest
import torch

import curdkv
from curdkv.analysis import attention_errors, eviction_study, reconstruction_study
from curdkv.analysis.common import full_attention
from curdkv.analysis.eviction import eviction_errors, spearman
from curdkv.bench import BenchSettings, run_bench
from curdkv.cli.main import main
from curdkv.kernels import leverage
from curdkv.presses.curdkv import exact_leverage
from conftest import INTERPRETED, KERNEL_DEVICE, tiny_model


def random_states(b=1, h=4, h_kv=2, n=40, m=6, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, m, d, generator=gen)
    k = torch.randn(b, h_kv, n + m, d, generator=gen)
    v = torch.randn(b, h_kv, n + m, d, generator=gen)
    return q, k, v


def direct_errors(q, k, v, keep, scaling):
    """One query head and one query at a time, nothing vectorised."""
    b, h, m, _ = q.shape
    n = keep.shape[-1]
    group = h // k.shape[1]
    logit_err, out_err = torch.zeros(b, h), torch.zeros(b, h)
    for bi in range(b):
        for hi in range(h):
            kh, vh, kept = k[bi, hi // group], v[bi, hi // group], keep[bi, hi // group]
            dl2 = l2 = do2 = o2 = 0.0
            for i in range(m):
                visible = n + i + 1
                logits = (kh[:visible] @ q[bi, hi, i]) * scaling
                l2 += float(logits[:n].square().sum())
                dl2 += float(logits[:n][~kept].square().sum())
                out = logits.softmax(0) @ vh[:visible]
                allowed = torch.cat([kept, torch.ones(visible - n, dtype=torch.bool)])
                out_c = logits[allowed].softmax(0) @ vh[:visible][allowed]
                o2 += float(out.square().sum())
                do2 += float((out - out_c).square().sum())
            logit_err[bi, hi], out_err[bi, hi] = (dl2 / l2) ** 0.5, (do2 / o2) ** 0.5
    return logit_err, out_err


def test_attention_errors_match_direct_computation():
    q, k, v = random_states()
    keep = torch.rand(1, 2, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    logit_err, out_err = attention_errors(q, k, v, keep, 0.3)
    ref_logit, ref_out = direct_errors(q, k, v, keep, 0.3)
    torch.testing.assert_close(logit_err, ref_logit, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out_err, ref_out, rtol=1e-4, atol=1e-6)
    assert bool((out_err > 0).all())


def test_nothing_evicted_means_no_error():
    q, k, v = random_states()
    logit_err, out_err = attention_errors(q, k, v, torch.ones(1, 2, 40, dtype=torch.bool), 0.3)
    assert float(logit_err.abs().max()) == 0.0
    assert float(out_err.abs().max()) < 1e-6


def test_full_attention_is_what_the_model_computes():
    """The recorded continuation queries attend exactly as the model's own attention did."""
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    layer, m = 1, 8
    seen = {}
    o_proj = model.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    try:
        capture = curdkv.capture_prefill(model, ids, query_window=m)
    finally:
        handle.remove()
    attn = model.model.layers[layer].self_attn
    _, _, out = full_attention(capture.queries[layer][:, :, -m:], capture.keys[layer], capture.values[layer],
                               attn.scaling, 48 - m)
    expected = seen["x"][:, -m:].unflatten(-1, (4, 16)).transpose(1, 2)  # [B, H, M, D]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_single_eviction_error_closed_form_matches_recompute():
    q, k, v = random_states(n=30, m=5)
    attention, error = eviction_errors(q, k, v, 30, 0.5)
    for head in (0, 3):
        for j in (0, 7, 29):
            keep = torch.ones(1, 2, 30, dtype=torch.bool)
            keep[0, head // 2, j] = False
            _, out_err = attention_errors(q, k, v, keep, 0.5)
            assert error[0, head, j].item() == pytest.approx(out_err[0, head].item(), rel=1e-4)
    _, probs, _ = full_attention(q, k, v, 0.5, 30)
    torch.testing.assert_close(attention, probs[..., :30].mean(2))


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_reconstruction_study_rows_and_averages():
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(0))
    result = reconstruction_study(model, ids, 16, ["curdkv", "knorm"], [0.0, 0.5])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 4  # presses x ratios x layers x query heads
    for r in rows:
        if r["compression_ratio"] == 0.0:
            assert r["logit_error"] == 0.0 and r["output_error"] < 1e-6
        else:
            assert 0 < r["logit_error"] < 1 and r["output_error"] > 0
    for s in result["summary"]:
        group = [r for r in rows if r["press"] == s["press"] and r["compression_ratio"] == s["compression_ratio"]]
        assert s["output_error"] == pytest.approx(sum(r["output_error"] for r in group) / len(group))
    with pytest.raises(ValueError, match="window"):
        reconstruction_study(model, ids[:, :70], 16, ["snapkv"], [0.5])


def test_eviction_study_checks_layer_and_head():
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    result = eviction_study(model, ids, 8, 1, 3)
    assert len(result["mean_attention"]) == len(result["eviction_error"]) == 56
    assert -1 <= result["spearman"] <= 1
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\]"):
        eviction_study(model, ids, 8, 2, 0)
    with pytest.raises(ValueError, match=r"head must be a query head in \[0, 3\]"):
        eviction_study(model, ids, 8, 0, 4)


def test_analyze_cli_on_smollm2(smollm2, tmp_path):
    assert main(["analyze", "eviction", "--context-tokens", "256", "--future-tokens", "16",
                 "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eviction.json").read_text())
    assert len(result["mean_attention"]) == 256 and result["layer"] == 15
    assert (tmp_path / "eviction.png").stat().st_size > 0
    assert main(["analyze", "reconstruction", "--presses", "curdkv,snapkv", "--ratios", "0.5",
                 "--context-tokens", "256", "--future-tokens", "16", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "reconstruction.md").read_text()
    assert "| curdkv" in table and "| snapkv" in table


# ------------------------------------------------------------------ leverage fast path

def structured_states(n=600, d=32, dtype=torch.bfloat16, seed=0):
    """Keys-like states: a few outlier channels, a near-low-rank bulk."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, 4, generator=gen) @ torch.randn(4, d, generator=gen)
    x = x + 0.05 * torch.randn(1, 2, n, d, generator=gen)
    x[..., :2] *= 30
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_precision_leverage_matches_float64(dtype):
    x = structured_states(dtype=dtype)
    ref = exact_leverage(x)
    hi, lo = leverage.split_terms(leverage.whitening(leverage.gram_torch(x)), dtype)
    fast = leverage.whitened_norms_torch(x, hi, lo)
    torch.testing.assert_close(fast, ref, rtol=2e-3, atol=1e-6)
    # One half-precision term is not enough: that is why W is split.
    one = leverage.whitened_norms_torch(x, hi, torch.zeros_like(lo))
    assert float(((one - ref).abs() / ref).max()) > 5 * float(((fast - ref).abs() / ref).max())


def test_half_precision_leverage_of_keys_and_narrower_values():
    keys, values = structured_states(d=32), structured_states(d=16, seed=1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and leverage.triton is not None else [])
    for device in devices:  # on CUDA each takes the fused kernels on its own
        lk, lv = leverage.half_precision_leverage(keys.to(device), values.to(device))
        torch.testing.assert_close(lk.cpu(), exact_leverage(keys), rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(lv.cpu(), exact_leverage(values), rtol=2e-3, atol=1e-6)


def test_half_precision_leverage_refuses_float32():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        leverage.half_precision_leverage(torch.randn(1, 1, 8, 4))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        leverage.half_precision_leverage(torch.randn(1, 1, 8, 4).bfloat16(), torch.randn(1, 1, 8, 4))


@pytest.mark.kernel
@pytest.mark.parametrize("n", [64, 1000, 70000])
@pytest.mark.parametrize("d", [64, 128])
def test_triton_leverage_kernels_match_torch(n, d):
    if INTERPRETED and n > 1000:
        pytest.skip("long contexts run on CUDA only (the interpreter is slow)")
    x = structured_states(n=n, d=d).to(KERNEL_DEVICE)
    torch.testing.assert_close(leverage.gram(x), leverage.gram_torch(x), rtol=1e-4, atol=1e-2)
    hi, lo = leverage.split_terms(leverage.whitening(leverage.gram_torch(x)), x.dtype)
    torch.testing.assert_close(leverage.whitened_norms(x, hi, lo), leverage.whitened_norms_torch(x, hi, lo),
                               rtol=1e-4, atol=1e-6)
    if INTERPRETED:
        return  # on CPU the press takes the torch route: the end-to-end kernel route needs CUDA
    ref = exact_leverage(x)
    y = structured_states(n=n, d=d, seed=1).cuda()
    lk, lv = leverage.half_precision_leverage(x, y)
    # Against float64 the float32 Gram's rounding grows with N: 0.9% at worst at 70K rows.
    torch.testing.assert_close(lk, ref, rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(lv, exact_leverage(y), rtol=2e-2, atol=1e-6)


def test_whitening_without_sync_equals_whitening_and_survives_indefinite_heads():
    x = structured_states(d=16).double()
    grams = leverage.gram_torch(x)
    torch.testing.assert_close(leverage.whitening_without_sync(grams), leverage.whitening(grams), rtol=0, atol=0)
    # A head indefinite beyond the ridge (a float32 Gram's rounding on a rank-deficient head
    # can do this) takes the stronger-ridge factorisation; the other head is untouched.
    bad = grams.clone()
    indefinite = torch.eye(16, dtype=bad.dtype)
    indefinite[0, 1] = indefinite[1, 0] = 1 + 1e-5  # unit diagonal, smallest eigenvalue -1e-5 < -ridge
    bad[0, 0] = indefinite
    assert int(torch.linalg.cholesky_ex(indefinite.double() + 1e-6 * torch.eye(16, dtype=torch.float64)).info) > 0
    w = leverage.whitening_without_sync(bad)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0, 1], leverage.whitening(grams)[0, 1], rtol=0, atol=0)
    fallback = indefinite.double() + leverage.FALLBACK_RIDGE * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(w[0, 0] @ w[0, 0].T, torch.linalg.inv(fallback), rtol=1e-9, atol=1e-9)




def sketch_case(r, dtype):
    """A press's sketch of 3 heads of width 64, and states of 2 sequences (the second a quarter of the first)."""
    from curdkv.presses.curdkv import CurDKVPress

    g = CurDKVPress(estimator="projection", projection_dim=r).projection(3, 64, "cpu")
    x = structured_states(n=700, d=64, dtype=dtype).expand(2, 2, 700, 64).clone()
    x = torch.cat([x, x[:, :1] * 0.5], 1)
    x[1] *= 0.25
    return g, x


@pytest.mark.parametrize("r", [1, 20, 32, 64])
def test_projection_terms_give_the_float32_projection(r):
    from curdkv.presses.curdkv import projected_leverage

    g, x = sketch_case(r, torch.bfloat16)
    hi, lo = leverage.projection_terms(g, torch.bfloat16)
    assert hi.shape == lo.shape == (3, 64, max(16, 1 << (r - 1).bit_length())) and hi.dtype == torch.bfloat16
    assert not hi[..., r:].any() and not lo[..., r:].any()
    # Split terms carry ~16 bits of G: float32 agreement to ~1e-4; one term alone is ~100x worse.
    want = projected_leverage(x, g)
    torch.testing.assert_close(leverage.whitened_norms_torch(x, hi, lo), want, rtol=2e-4, atol=1e-3)
    one = leverage.whitened_norms_torch(x, hi, torch.zeros_like(lo))
    assert float(((one - want).abs() / want).max()) > 1e-3


def test_sketch_estimator_takes_one_sketch_per_head_size():
    from curdkv.presses.curdkv import CurDKVPress, projected_leverage

    press = CurDKVPress(estimator="projection", projection_dim=8)
    keys, values = torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 16)
    view = type("View", (), {"keys": keys, "values": values, "num_kv_heads": 2})()
    lk, lv = press.leverages(view)
    assert lk.shape == lv.shape == (1, 2, 50)
    torch.testing.assert_close(lk, projected_leverage(keys, press.projection(2, 32, "cpu")))
    torch.testing.assert_close(lv, projected_leverage(values, press.projection(2, 16, "cpu")))
    # Keys and values of one head size share one sketch (the paper's G).
    assert press.projection(2, 32, "cpu") is press.projection(2, 32, "cpu")


@pytest.mark.kernel
@pytest.mark.parametrize("r", [1, 20, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sketch_norms_kernel_equals_float32_projection(r, dtype):
    from curdkv.presses.curdkv import CurDKVPress, projected_leverage

    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("bfloat16 runs on CUDA only (Triton's interpreter converts it wrongly through numpy)")
    g, x = sketch_case(r, dtype)
    hi, lo = leverage.projection_terms(g, dtype)
    got = leverage.transformed_norms(x.to(KERNEL_DEVICE), hi.to(KERNEL_DEVICE), lo.to(KERNEL_DEVICE)).cpu()
    want = projected_leverage(x, g)
    assert got.shape == want.shape == (2, 3, 700)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-3)
    # Every sequence uses the shared terms: the second is the first scaled by 1/16.
    torch.testing.assert_close(got[1], got[0] / 16, rtol=1e-5, atol=1e-6)
    if INTERPRETED:
        return  # on CPU the press takes the torch route: the end-to-end kernel route needs CUDA
    # The press takes the kernel on CUDA and gives the same scores.
    press = CurDKVPress(estimator="projection", projection_dim=r)
    view = type("View", (), {"keys": x.cuda(), "values": x.flip(2).cuda(), "num_kv_heads": 3})()
    lk, lv = press.leverages(view)
    torch.testing.assert_close(lk.cpu(), want, rtol=2e-4, atol=1e-3)
    torch.testing.assert_close(lv.cpu(), want.flip(-1), rtol=2e-4, atol=1e-3)


def test_transformed_norms_refuses_terms_of_the_wrong_shape():
    x = torch.randn(1, 2, 8, 32).half()
    with pytest.raises(ValueError, match="power of two >= 16"):
        leverage.transformed_norms(x, torch.zeros(2, 32, 20).half(), torch.zeros(2, 32, 20).half())
    with pytest.raises(ValueError, match=r"\[\.\.\., 32, R\]"):
        leverage.transformed_norms(x, torch.zeros(2, 16, 16).half(), torch.zeros(2, 16, 16).half())


@pytest.mark.kernel
@pytest.mark.parametrize("n,k,dk,dv", [(200, 70, 32, 16), (1000, 1, 64, 64), (130, 130, 16, 32)])
def test_gather_kernel_equals_torch_gather(n, k, dk, dv):
    from curdkv.kernels.gather import gather_kv
    from curdkv.cache.gather import gather_tokens

    gen = torch.Generator().manual_seed(n + k)
    keys = torch.randn(2, 3, n, dk, generator=gen).half().to(KERNEL_DEVICE)
    values = torch.randn(2, 3, n, dv, generator=gen).half().to(KERNEL_DEVICE)
    idx = torch.rand(2, 3, n, generator=gen).argsort(-1)[..., :k].sort(-1).values.to(KERNEL_DEVICE)
    got_k, got_v = gather_kv(keys, values, idx)
    assert torch.equal(got_k, gather_tokens(keys, idx)) and torch.equal(got_v, gather_tokens(values, idx))
    # A non-contiguous view (keys sliced out of a wider tensor) is read correctly too.
    wide = torch.cat([keys, keys], dim=2)[:, :, n:]
    assert torch.equal(gather_kv(wide, values, idx)[0], gather_tokens(keys, idx))


@pytest.mark.kernel
@pytest.mark.parametrize("b,h,h_kv,n,w,d", [(1, 4, 2, 300, 16, 32), (2, 6, 2, 200, 16, 16), (1, 2, 2, 80, 16, 32),
                                           (1, 6, 2, 3000, 32, 16)])
def test_window_attention_kernel_equals_softmax_mean(b, h, h_kv, n, w, d):
    import types

    from curdkv.kernels.window_attention import window_attention_mean
    from curdkv.presses.base import ScoringView
    from curdkv.presses.window import window_attention

    gen = torch.Generator().manual_seed(n)
    q = torch.randn(b, h, w, d, generator=gen).half()
    k = (2 * torch.randn(b, h_kv, n, d, generator=gen)).half()
    view = ScoringView(keys=k, values=k, queries=q, module=types.SimpleNamespace(scaling=d**-0.5, layer_idx=0),
                       layer_idx=0)
    ref = window_attention(view, w)[..., : n - w].mean(2)
    got = window_attention_mean(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), d**-0.5, n - w).cpu()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.max()))


def test_window_attention_kernel_refuses_unsupported_shapes():
    from curdkv.kernels.window_attention import window_attention_mean

    if leverage.triton is None:
        pytest.skip("Triton is not installed: the kernel is never called")
    with pytest.raises(ValueError, match="power-of-two window"):
        window_attention_mean(torch.randn(1, 2, 12, 16).half(), torch.randn(1, 2, 50, 16).half(), 0.25, 38)
    with pytest.raises(ValueError, match="bf16/fp16"):  # float32 would be rounded to TF32 by the dot
        window_attention_mean(torch.randn(1, 2, 16, 16), torch.randn(1, 2, 50, 16), 0.25, 34)
    with pytest.raises(ValueError, match="upto must be in"):
        window_attention_mean(torch.randn(1, 2, 16, 16).half(), torch.randn(1, 2, 50, 16).half(), 0.25, 40)


@pytest.mark.skipif(not (torch.cuda.is_available() and leverage.triton is not None), reason="needs CUDA and Triton")
@pytest.mark.parametrize("name", ["snapkv", "adasnapkv", "lava"])
def test_window_presses_score_the_same_on_the_fused_path(name):
    import types

    from curdkv.presses.base import ScoringView

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 64, 64, generator=gen).bfloat16()
    k, v = torch.randn(1, 2, 2000, 64, generator=gen).bfloat16(), torch.randn(1, 2, 2000, 64, generator=gen).bfloat16()
    module = types.SimpleNamespace(scaling=0.125, layer_idx=0)
    press = curdkv.get_press(name, 0.5)
    cpu = press.score(ScoringView(keys=k, values=v, queries=q, module=module, layer_idx=0))
    gpu = press.score(ScoringView(keys=k.cuda(), values=v.cuda(), queries=q.cuda(), module=module, layer_idx=0))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-7)


def test_gather_kernel_refuses_unsupported_shapes():
    from curdkv.kernels.gather import gather_kv

    if leverage.triton is None:
        pytest.skip("Triton is not installed: gather_kv is never called")
    with pytest.raises(ValueError, match="power-of-two head dims"):
        gather_kv(torch.randn(1, 1, 4, 12), torch.randn(1, 1, 4, 12), torch.zeros(1, 1, 2, dtype=torch.long))


# ------------------------------------------------------------------ bench

def test_bench_cpu_json_and_resume(tmp_path, monkeypatch):
    settings = BenchSettings(model="random:tiny-llama", lengths=(768,), ratios=(0.0, 0.5), methods=("curdkv", "snapkv"),
                             decode_tokens=2, repeats=1, decode_repeats=1, device="cpu", dtype="float32")
    scored = []
    original = curdkv.CurDKVPress.score
    monkeypatch.setattr(curdkv.CurDKVPress, "score", lambda self, view: scored.append(view.layer_idx) or original(self, view))
    result = run_bench(settings, tmp_path, progress=False)
    # Every timed build scores again (the overhead includes scoring): on CPU, a warm-up and a
    # timed repeat for the device time and the same for the wall time, beside the compressing prefill.
    assert scored.count(0) >= 5
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["settings"]["model"] == "random:tiny-llama" and saved["environment"]["torch"] == torch.__version__
    rows = {(r["method"], r["compression_ratio"]): r for r in saved["rows"]}
    assert set(rows) == {("full", 0.0), ("curdkv", 0.5), ("snapkv", 0.5)}
    full = rows["full", 0.0]
    assert full["kv_bytes"] == 2 * 2 * 2 * 768 * 16 * 4  # K and V x layers x KV heads x tokens x dim x fp32
    assert rows["curdkv", 0.5]["kv_bytes"] == full["kv_bytes"] // 2
    for r in saved["rows"]:
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0
        assert r["decode_gpu_ms_per_token"] is None  # no GPU time on CPU, and no column derived from it
        assert "decode_gpu_efficiency" not in r and "decode_efficiency" in r
        if r["method"] == "curdkv":  # two passes over K and V plus the kept half read and written
            floor = r["bandwidth_limit_ms_per_layer"] * (2 + 2 * 0.5)
            assert r["overhead_floor_ms_per_layer"] == pytest.approx(floor)
            assert r["overhead_vs_floor"] == pytest.approx(r["overhead_ms_per_layer"] / floor)
        assert (r["overhead_ms_per_layer"] > 0) == (r["method"] != "full")
        assert (r["overhead_wall_ms_total"] > 0) == (r["method"] != "full")
        # On CPU nothing overlaps: the layer's own time, as a share of the prefill over both layers.
        assert (r["overlapped_overhead_ms_per_layer"] > 0) == (r["method"] != "full")
        assert r["overlapped_overhead_percent_of_prefill"] == pytest.approx(
            100 * r["overlapped_overhead_ms_per_layer"] * 2 / 1000 / full["prefill_s"])
    assert "curdkv_overhead_percent" in result["goals"] and "curdkv_overlapped_overhead_percent" in result["goals"]
    assert "decode_efficiency" in result["goals"] and "decode_gpu_efficiency" not in result["goals"]
    assert saved["fixed_decode_ms_per_token"] > 0 and saved["fixed_decode_gpu_ms_per_token"] is None
    assert "overlapped % prefill" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0 and "### 768 tokens" in (tmp_path / "bench.md").read_text()
    # A second run adds a length and keeps the first one's measurements.
    more = BenchSettings(**{**settings.as_dict(), "lengths": (768, 1024)})
    result = run_bench(more, tmp_path, progress=False)
    assert sorted({r["context_tokens"] for r in result["rows"]}) == [768, 1024]
    assert [r for r in result["rows"] if r["context_tokens"] == 768] == saved["rows"]
    other = BenchSettings(**{**settings.as_dict(), "decode_tokens": 3})
    with pytest.raises(ValueError, match="other settings"):
        run_bench(other, tmp_path, progress=False)


def test_bench_resumes_by_method_at_one_length(tmp_path):
    settings = BenchSettings(model="random:tiny-llama", lengths=(512,), ratios=(0.0, 0.5), methods=("curdkv",),
                             decode_tokens=2, repeats=1, decode_repeats=1, device="cpu", dtype="float32")
    first = run_bench(settings, tmp_path, progress=False)
    full = next(r for r in first["rows"] if r["method"] == "full")
    second = run_bench(BenchSettings(**{**settings.as_dict(), "methods": ("snapkv",)}), tmp_path, progress=False)
    rows = {(r["method"], r["compression_ratio"]): r for r in second["rows"]}
    assert set(rows) == {("full", 0.0), ("curdkv", 0.5), ("snapkv", 0.5)}
    # Neither the full cache nor CurDKV was measured again; the new row is derived against the same full cache.
    assert rows["full", 0.0]["prefill_s"] == full["prefill_s"]
    assert rows["curdkv", 0.5]["overhead_ms_total"] == first["rows"][1]["overhead_ms_total"]
    assert rows["snapkv", 0.5]["overhead_percent_of_prefill"] == pytest.approx(
        100 * rows["snapkv", 0.5]["overhead_ms_total"] / 1000 / full["prefill_s"])
    assert second["settings"]["methods"] == ("curdkv", "snapkv")
    assert second["fixed_decode_ms_per_token"] == first["fixed_decode_ms_per_token"]
    # Everything there already: nothing is measured, the outputs are rewritten.
    assert run_bench(settings, tmp_path, progress=False)["rows"] == second["rows"]


def test_bench_runs_one_untimed_prefill_per_method_before_the_timed_ones(tmp_path, monkeypatch):
    import curdkv.bench.speed as speed

    calls = []
    original = speed._prefill

    def recording(model, ids, press=None):
        calls.append(("full", 0.0) if press is None else (press.name, press.compression_ratio))
        return original(model, ids, press)

    monkeypatch.setattr(speed, "_prefill", recording)
    settings = BenchSettings(model="random:tiny-llama", lengths=(512,), ratios=(0.0, 0.5, 0.8),
                             methods=("curdkv", "snapkv"), decode_tokens=1, repeats=1, decode_repeats=1,
                             device="cpu", dtype="float32")
    result = run_bench(settings, tmp_path, progress=False)
    # calls[0]: the run's warm-up prefill (kernels compiled once); then this length's untimed ones.
    warm, timed = calls[1:4], calls[4:]
    assert warm == [("full", 0.0), ("curdkv", 0.5), ("snapkv", 0.5)]
    assert timed == [("full", 0.0), ("curdkv", 0.5), ("curdkv", 0.8), ("snapkv", 0.5), ("snapkv", 0.8)]
    assert len(result["rows"]) == 5


def test_bench_overhead_sums_each_layer_timed_alone_and_refuses_other_timings(tmp_path, monkeypatch):
    import curdkv.bench.speed as speed
    from curdkv.bench.timing import GpuTime

    timed = []

    def fake_gpu_time(fn, device, repeats, warmup=1, host_seconds=None, check=True):
        before = len(scored)
        fn()
        timed.append(sorted(set(scored[before:])))
        # The host falls behind in 3 of 4 repeats of CurDKV's second layer; LAVa's build is not checked.
        return GpuTime(0.002, 4, None if not check else 3 if len(timed) == 2 else 0)

    scored = []
    original = curdkv.CurDKVPress.score
    monkeypatch.setattr(curdkv.CurDKVPress, "score", lambda self, view: scored.append(view.layer_idx) or original(self, view))
    monkeypatch.setattr(speed, "gpu_time", fake_gpu_time)
    settings = BenchSettings(model="random:tiny-llama", lengths=(256,), ratios=(0.0, 0.5), methods=("curdkv", "lava"),
                             decode_tokens=1, repeats=1, decode_repeats=1, device="cpu", dtype="float32")
    result = run_bench(settings, tmp_path, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    # CurDKV: each of the 2 layers timed on its own, 2 ms each; LAVa (budgets need every layer) as one build.
    assert timed[:2] == [[0], [1]]
    assert rows["curdkv"]["overhead_ms_total"] == pytest.approx(4.0)
    assert rows["lava"]["overhead_ms_total"] == pytest.approx(2.0)
    assert rows["curdkv"]["overhead_host_behind_fraction"] == 3 / 8 and rows["lava"]["overhead_host_behind_fraction"] is None
    assert result["overhead_timing"] == speed.OVERHEAD_TIMING
    table = (tmp_path / "bench.md").read_text()
    assert f"median of 1, {speed.OVERHEAD_TIMING}." in table
    assert "The host fell behind the GPU in part of the overhead timings" in table and "curdkv 50% (38%)" in table
    assert "lava 50% (" not in table
    # A bench.json timed the earlier way (one sleep before a whole build) is not resumed into.
    saved = json.loads((tmp_path / "bench.json").read_text())
    del saved["overhead_timing"]
    (tmp_path / "bench.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="timed the compression overhead another way"):
        run_bench(settings, tmp_path, progress=False)
    # Nor one whose decode was timed another way (replayed graphs on CUDA, the eager loop here).
    assert saved["decode_timing"] == speed.decode_timing(torch.device("cpu")) == "eager loop of model(...) calls"
    saved["overhead_timing"] = speed.OVERHEAD_TIMING
    saved["decode_timing"] = "replayed CUDA graph, as ctx.ask decodes"
    (tmp_path / "bench.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="timed decoding another way"):
        run_bench(settings, tmp_path, progress=False)


def test_bench_decode_speedups_from_wall_and_gpu_times():
    from curdkv.bench.speed import _derive, check_goals

    def row(method, ratio, wall, gpu):
        return dict(context_tokens=4096, method=method, compression_ratio=ratio, prefill_s=1.0, kv_bytes=100,
                    peak_prefill_bytes=None, overhead_ms_total=0.0, overlapped_overhead_ms_per_layer=None,
                    bandwidth_limit_ms_per_layer=None, overhead_ms_per_layer=0.0, layers=2,
                    decode_ms_per_token=wall, decode_gpu_ms_per_token=gpu)

    # Fixed parts: 20 ms wall, 4 ms GPU; the full cache adds 20 ms wall and 8 ms GPU.
    rows = _derive([row("full", 0.0, 40.0, 12.0), row("curdkv", 0.5, 32.0, 6.0)], 20.0, 4.0)
    r = rows[1]
    assert r["decode_speedup"] == pytest.approx(40 / 32) and r["ideal_decode_speedup"] == pytest.approx(40 / 30)
    assert r["decode_efficiency"] == pytest.approx((40 / 32) / (40 / 30))
    assert r["decode_gpu_speedup"] == pytest.approx(2.0) and r["ideal_decode_gpu_speedup"] == pytest.approx(1.5)
    assert r["decode_gpu_efficiency"] == pytest.approx(4 / 3)
    goals = check_goals(rows)
    assert goals["decode_efficiency"]["met"] and goals["decode_gpu_efficiency"]["worst"] == pytest.approx(4 / 3)
    # Rows without a GPU time (CPU, or resumed from an older JSON) derive only the wall columns.
    rows = _derive([row("full", 0.0, 40.0, None), row("curdkv", 0.5, 32.0, None)], 20.0, None)
    assert "decode_gpu_speedup" not in rows[1] and "decode_gpu_efficiency" not in check_goals(rows)


def test_bench_goals_judge_both_curdkv_estimators_at_the_longest_context():
    from curdkv.bench.speed import check_goals

    def row(method, ratio, percent, vs_bandwidth, tokens=8192):
        return dict(context_tokens=tokens, method=method, compression_ratio=ratio, peak_prefill_bytes=None,
                    overhead_percent_of_prefill=percent,
                    overlapped_overhead_percent_of_prefill=None if percent is None else percent / 2,
                    overhead_vs_bandwidth=vs_bandwidth)

    rows = [row("full", 0.0, None, None), row("curdkv", 0.2, 0.3, 5.0), row("curdkv", 0.9, 0.25, 4.0),
            row("curdkv-sketch", 0.2, 0.15, 2.5), row("curdkv-sketch", 0.9, 0.08, 1.5),
            row("snapkv", 0.5, 0.5, 3.0), row("curdkv-sketch", 0.9, 9.0, 9.0, tokens=4096)]
    goals = check_goals(rows)
    assert goals["context_tokens"] == 8192
    assert goals["curdkv_overhead_percent"] == {"worst": 0.3, "max": 0.2, "met": False}
    assert goals["curdkv_overlapped_overhead_percent"]["met"]
    # The shorter context's slow row is not judged; the worst of the longest is.
    assert goals["curdkv_sketch_overhead_percent"] == {"worst": 0.15, "max": 0.2, "met": True}
    assert goals["curdkv_sketch_overhead_vs_bandwidth"] == {"worst": 2.5, "max": 2.0, "met": False}
    assert goals["snapkv_overhead_percent"]["met"]
    assert not any(name.startswith("adacurdkv") for name in goals)


def test_gpu_timing_doubles_the_sleep_while_the_host_is_behind():
    from curdkv.bench.timing import SLEEP_DOUBLINGS, _ahead_of_host

    sleeps = []

    def run(cycles, behind_until):
        sleeps.append(cycles)
        return cycles / 1000, cycles < behind_until

    assert _ahead_of_host(lambda c: run(c, 400), 100) == (0.4, False, 400)
    assert sleeps == [100, 200, 400]
    sleeps.clear()
    # Never ahead (a synchronisation inside the timed function): given up after SLEEP_DOUBLINGS doublings.
    seconds, behind, cycles = _ahead_of_host(lambda c: run(c, float("inf")), 100)
    assert behind and cycles == 100 * 2**SLEEP_DOUBLINGS and len(sleeps) == SLEEP_DOUBLINGS + 1
    assert _ahead_of_host(lambda c: run(c, 0), 100) == (0.1, False, 100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU time needs CUDA")
def test_gpu_time_sees_when_the_host_is_behind():
    from curdkv.bench.timing import gpu_time

    x = torch.randn(1024, 1024, device="cuda")
    launches = lambda: [x.add_(1e-3) for _ in range(50)]
    ahead = gpu_time(launches, torch.device("cuda"), 5)
    assert ahead.host_behind == 0 and ahead.repeats == 5 and ahead.seconds > 0
    # A wait on the GPU inside the timed function keeps the host behind whatever the sleep.
    waits = gpu_time(lambda: (launches(), torch.cuda.synchronize()), torch.device("cuda"), 2)
    assert waits.host_behind == 2
    unchecked = gpu_time(lambda: (launches(), torch.cuda.synchronize()), torch.device("cuda"), 2, check=False)
    assert unchecked.host_behind is None and unchecked.seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU time needs CUDA")
def test_decode_gpu_time_is_below_wall_time_and_grows_with_the_cache():
    from curdkv.bench.timing import decode_gpu_seconds_per_token, decode_seconds_per_token
    from curdkv import capture_prefill

    model, _ = curdkv.load_model("random:tiny-llama", dtype=torch.float16, device="cuda")
    times = {}
    for n in (64, 2048):
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        cache = capture_prefill(model, ids).build_cache(None)
        wall = decode_seconds_per_token(model, cache, ids[:, -1:], n, 5)
        times[n] = decode_gpu_seconds_per_token(model, cache, ids[:, -1:], n, 5)
        assert 0 < times[n] < wall
    assert times[2048] > times[64]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph replay needs CUDA")
def test_replayed_decode_is_faster_than_the_eager_loop_and_leaves_the_cache_as_it_was():
    from curdkv.bench.timing import decode_seconds_per_token, replayed_seconds_per_token
    from curdkv import capture_prefill

    model, _ = curdkv.load_model("random:tiny-llama", dtype=torch.float16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 1024), device="cuda")
    cache = capture_prefill(model, ids).build_cache(curdkv.get_press("curdkv", 0.5))
    before, length = cache.layers[0].keys.clone(), cache.get_seq_length()
    eager = decode_seconds_per_token(model, cache, ids[:, -1:], 1024, 8)
    replayed = replayed_seconds_per_token(model, cache, 1024, 8)
    assert 0 < replayed < eager
    assert cache.get_seq_length() == length and torch.equal(cache.layers[0].keys, before)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        replayed_seconds_per_token(model, cache, 1024, 1)


@pytest.mark.parametrize("field,value,message", [
    ("lengths", (10,), "lengths must be integers >= 64"),
    ("ratios", (1.0,), r"ratios must be numbers in \[0, 1\)"),
    ("methods", ("nope",), "nope"),
    ("decode_tokens", 0, "decode_tokens must be an integer >= 1"),
])
def test_bench_settings_reject_bad_input(field, value, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**{field: value})


def test_bench_cli_errors(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--ratios", "1.5", "--out", "x"])
    assert "--ratios" in capsys.readouterr().err
    assert main(["bench", "--model", "random:tiny-llama", "--device", "cpu", "--lengths", "8192",
                 "--out", "/nonexistent/never"]) == 2
    assert "context of 4096" in capsys.readouterr().err


@pytest.mark.kernel
def test_fused_whitening_terms_equal_the_torch_steps_and_fall_back_per_matrix():
    # Partial Gram sums of 3 matrices; the second is indefinite at the first ridge and takes the fallback.
    x = structured_states(n=300, d=16, dtype=torch.float32).reshape(2, 300, 16)
    partials = torch.stack([x[:, :150].transpose(-1, -2) @ x[:, :150], x[:, 150:].transpose(-1, -2) @ x[:, 150:]], 1)
    bad = torch.eye(16)
    bad[0, 1] = bad[1, 0] = 1 + 1e-5
    partials = torch.cat([partials[:1], torch.stack([bad, torch.zeros(16, 16)])[None], partials[1:]])
    assert int(torch.linalg.cholesky_ex(leverage._scaled(partials[1].sum(0), 1e-6)[0]).info) > 0
    # Triton's interpreter converts to bfloat16 wrongly (through numpy); bfloat16 is checked on CUDA.
    for dtype in (torch.bfloat16, torch.float16) if KERNEL_DEVICE == "cuda" else (torch.float16,):
        hi, lo = leverage.whitening_terms(partials.to(KERNEL_DEVICE), dtype)
        want_hi, want_lo = leverage.split_terms(leverage.whitening_without_sync(partials.double().sum(1)), dtype)
        assert hi.dtype == lo.dtype == dtype
        # The same W to the split's precision (the sums of the partials differ only in rounding).
        torch.testing.assert_close(hi.cpu().double() + lo.cpu().double(), want_hi.double() + want_lo.double(),
                                   rtol=1e-4, atol=1e-6)
    w = hi[1].cpu().double() + lo[1].cpu().double()
    fallback, scale = leverage._scaled(partials[1].sum(0), leverage.FALLBACK_RIDGE)
    want = scale[:, None] * torch.linalg.inv(fallback) * scale[None, :]
    torch.testing.assert_close(w @ w.T, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
