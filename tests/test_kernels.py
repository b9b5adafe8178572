"""model/kernels.py: the inference kernels, the per-machine chooser, and the precisions."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from treespec.draft.loop import generate_all
from treespec.draft.ngram import NgramDrafter
from treespec.draft.types import SamplingParams
from treespec.model import Tokenizer, gpt, kernels
from treespec.model.kernels import CANDIDATES, ROW_BUCKETS, SKINNY, LinearKernel, Packed, available, plan

from conftest import tiny_model

# One-step error of a product with K=48: fp32 is exact to rounding; bf16 weights keep
# 8 bits of mantissa, int8 weights 7 bits of the row's largest value.
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 3e-2, "w8a8": 3e-2}


def w8a8_reference(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """What the w8a8 kernel computes, in torch: each row rounded to int8 with its own scale
    (largest magnitude / 127, ties to even), times the int8 weights, then both scales. The
    integer sums are exact in fp32 at these sizes."""
    m = x.abs().amax(dim=1, keepdim=True)
    q = torch.round(x * torch.where(m > 0, 127.0 / m, torch.zeros_like(m)))
    y = (q @ p.weight.float().T) * (m / 127.0) * p.scale
    return y if p.bias is None else y + p.bias


def test_the_compiled_kernel_builds():
    """CI must not silently lose the fast path: the C kernel builds on this machine."""
    assert SKINNY.load(), SKINNY.error
    assert set(available("float32")) == {"torch", "torch_wt", "skinny"}
    assert set(available("int8")) == {"torch", "skinny"}
    assert available("w8a8") == ["skinny"]  # only the kernel rounds activations, for every bucket


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("bias", [False, True])
def test_every_candidate_equals_f_linear(precision, layout, bias):
    """Each candidate computes F.linear with the packed (rounded) weight, for 1..N rows and
    beyond the last bucket; a weight stored transposed (HF's Conv1D layout, a view) packs the same."""
    g = torch.Generator().manual_seed(0)
    K = 64 if precision == "w8a8" else 48  # w8a8 multiplies bytes in 32s (K = 48: the int8 path)
    for out in (300, 9000):  # a trunk-sized weight and a head-sized one
        W = torch.randn(out, K, generator=g) * 0.1
        if layout == "transposed":
            W = W.t().contiguous().t()  # same values, column-major storage
            assert not W.is_contiguous()
        b = torch.randn(out, generator=g) if bias else None
        p = Packed.of(W, b, precision)
        ref_w = p.dequantized()
        assert (ref_w - W).abs().max() <= TOL[precision] * W.abs().max()
        for name in available(precision):
            for rows in (1, 2, 3, 4, 5, 7, 8, 9, 16, 33):
                x = torch.randn(rows, K, generator=g)
                y = CANDIDATES[name](x, p)
                assert y.shape == (rows, out) and y.dtype == torch.float32 and y.is_contiguous()
                # bf16 GEMM rounds the activations too (oneDNN); w8a8 rounds them to int8
                want = w8a8_reference(x, p) if precision == "w8a8" else F.linear(x, ref_w, b)
                tol = 1e-4 if precision != "bfloat16" or name == "skinny" else 5e-2
                torch.testing.assert_close(y, want, rtol=tol, atol=tol)
        # Past the last bucket (a prompt), the last bucket's choice runs: here the C kernel, so
        # w8a8 rounds a prompt's activations as it rounds a decode step's.
        k = LinearKernel(p, {bk: "skinny" for bk in ROW_BUCKETS})
        x = torch.randn(1, 3 * ROW_BUCKETS[-1] // 2, K, generator=g)
        want = w8a8_reference(x[0], p)[None] if precision == "w8a8" else F.linear(x, ref_w, b)
        torch.testing.assert_close(k(x), want, rtol=1e-4, atol=1e-4)
        k = LinearKernel(p, {**{bk: "skinny" for bk in ROW_BUCKETS}, ROW_BUCKETS[-1]: "torch"})
        tol = 5e-2 if precision == "bfloat16" else 1e-4  # torch's GEMM: fp32 activations
        torch.testing.assert_close(k(x), F.linear(x, ref_w, b), rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_skinny_rows_do_not_depend_on_the_batch(precision):
    """A row's result is bit-identical whether it comes alone or among others: a verify
    step's rows equal the one-token forwards' (no rounding differences to flip a token)."""
    assert SKINNY.load(), SKINNY.error  # (run alone, no earlier test has built it)
    g = torch.Generator().manual_seed(1)
    p = Packed.of(torch.randn(700, 384, generator=g) * 0.05, torch.randn(700, generator=g), precision)
    x = torch.randn(9, 384, generator=g)
    full = CANDIDATES["skinny"](x, p)
    for i in range(9):
        assert torch.equal(CANDIDATES["skinny"](x[i:i + 1], p)[0], full[i])
    assert torch.equal(CANDIDATES["skinny"](x[:5], p), full[:5])


@pytest.mark.parametrize("march,path", [("x86-64-v4", "AVX-512 tiles"), ("x86-64-v3", "AVX2 tiles"),
                                        ("x86-64", "portable loop")])
def test_every_build_of_the_kernel_computes_the_same(monkeypatch, tmp_path, march, path):
    """Each of the kernel's paths (AVX-512 tiles, AVX2 tiles, the portable loop) equals
    F.linear and is batch-independent, at every tile shape: one row, full tiles, a ragged
    last tile of weight rows (N % 8 != 0) and of input rows. Built for each -march and
    loaded beside the native build; the AVX-512 build runs only where the CPU has it."""
    import platform

    if platform.machine() != "x86_64":
        pytest.fail("this project's CPUs are x86_64; an aarch64 build needs its own -march here")
    monkeypatch.setenv("TREESPEC_KERNEL_CACHE", str(tmp_path))
    build = kernels._Skinny(march=march)
    assert build.load(), build.error  # every build compiles and links on every CPU
    if march == "x86-64-v4" and "avx512f" not in kernels.cpu_flags():
        return  # running it needs the instructions: the AVX-512 CPUs' runs do the rest
    assert build.path() == path + (", w8a8 on bytes" if march != "x86-64" else "")
    monkeypatch.setattr(SKINNY, "lib", build.lib)
    g = torch.Generator().manual_seed(2)
    for precision in kernels.PRECISIONS:
        for K in (64, 40, 384):  # 40: not a multiple of 16, so AVX-512 builds take the loop
            p = Packed.of(torch.randn(301, K, generator=g) * 0.1, torch.randn(301, generator=g), precision)
            x = torch.randn(11, K, generator=g)
            full = CANDIDATES["skinny"](x, p)
            # w8a8 on bytes needs AVX2 and K a multiple of 32; elsewhere it is the int8 path
            on_bytes = precision == "w8a8" and K % 32 == 0 and march != "x86-64"
            assert build.lib.skinny_has_w8a8() == (march != "x86-64")
            want = w8a8_reference(x, p) if on_bytes else F.linear(x, p.dequantized(), p.bias)
            torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)
            for i in range(11):
                assert torch.equal(CANDIDATES["skinny"](x[i:i + 1], p)[0], full[i])
            for rows in (2, 3, 5):
                assert torch.equal(CANDIDATES["skinny"](x[:rows], p), full[:rows])


def test_chooser_picks_the_fastest_on_a_stub_timing(monkeypatch):
    """No thresholds: the timer decides. A sequence's decode buckets (1..16 rows) share one
    row-independent kernel; batched buckets take whatever the timer says is fastest."""
    m = tiny_model()

    def measure(group, rows, cand, weights):
        assert weights and all(isinstance(w, Packed) for w in weights)
        if rows == ROW_BUCKETS[-1]:  # a prompt's bucket, timed like the others
            return {"skinny": 0.2}.get(cand, 9.0)
        if rows >= 32:
            return {"torch": 0.5}.get(cand, 9.0)
        if rows == 2:
            return {"torch_wt": 0.1}.get(cand, 9.0)
        return {"torch": 3.0, "torch_wt": 2.0, "skinny": 1.0}[cand]

    kp = plan(m, "float32", measure=measure)
    decode = {1: "skinny", 2: "skinny", 4: "skinny", 8: "skinny", 16: "skinny"}
    assert ROW_BUCKETS[-1] == 128
    assert kp.choices["head"] == {**decode, 32: "torch", 64: "torch", 128: "skinny"}
    assert kp.choices["trunk"] == {**decode, 32: "torch", 64: "torch", 128: "skinny"}
    # Where the skinny kernel takes a bucket by construction, only it is timed there.
    assert kp.timings["trunk"][2] == {"skinny": 9.0}
    assert kp.timings["trunk"][32] == {"torch": 0.5, "torch_wt": 9.0, "skinny": 9.0}
    assert m.blocks[0].mlp.c_fc.kernel.table == kp.choices["trunk"]
    assert m.head_kernel.table == kp.choices["head"]
    assert m.blocks[0].fused is not None and m.blocks[0].fused.rows == set(decode) | {128}
    # Rows past the last bucket run with its choice (a long prompt).
    assert kernels.bucket(200) == 128 and kernels.bucket(65) == 128 and kernels.bucket(33) == 64
    assert kernels.bucket(1) == 1
    # The trunk group is every Linear of every block, in forward order.
    n_linear = sum(isinstance(x, gpt.Linear) for x in m.blocks.modules())
    assert n_linear == 4 * m.config.n_layer
    assert "1 row: {'trunk': 'skinny', 'head': 'skinny'}" in kp.describe()
    # Without the compiled kernel: the candidate fastest over the decode buckets together
    # (torch_wt: 2+0.1+2+2+2) takes them all, and no block is fused.
    monkeypatch.setattr(kernels, "available", lambda precision: ["torch", "torch_wt"])
    kp = plan(m, "float32", measure=measure)
    assert kp.choices["trunk"] == {1: "torch_wt", 2: "torch_wt", 4: "torch_wt", 8: "torch_wt", 16: "torch_wt",
                                   32: "torch", 64: "torch", 128: "torch"}
    assert m.blocks[0].fused is None


def test_other_share_is_the_machine_s_busy_time_less_this_process_s():
    # (machine busy s, own busy s, wall s) at start and end, on 2 CPUs
    assert kernels.other_share((10.0, 1.0, 0.0), (12.0, 2.0, 1.0), 2) == pytest.approx(0.5)  # one core of two
    assert kernels.other_share((10.0, 1.0, 0.0), (12.0, 3.0, 1.0), 2) == 0.0  # all of it was ours
    assert kernels.other_share((10.0, 1.0, 0.0), (14.5, 1.0, 1.0), 2) == 1.0  # clock skew: capped


def test_cpu_share_sees_a_process_that_keeps_every_core_busy():
    import os
    import subprocess
    import sys
    import time

    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)  # let them start
        share = kernels.CpuShare()
        time.sleep(1.0)
        busy = share.others()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy is not None and busy > 0.6, busy


@pytest.mark.parametrize("busy,warns", [(0.6, True), (0.02, False), (None, False)])
def test_a_plan_timed_on_a_busy_machine_says_so(monkeypatch, busy, warns):
    """Timings beside another job can pick a slower precision for good; the plan says
    what share of the CPUs was taken and, past BUSY_SHARE, what to do about it."""

    class Stub:
        def others(self):
            return busy

    monkeypatch.setattr(kernels, "CpuShare", Stub)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kp = plan(tiny_model(), "float32", measure=lambda g, r, c, w: 1.0)
    said = [str(w.message) for w in caught if "kept" in str(w.message)]
    assert kp.busy == busy and kp.to_dict()["busy"] == busy
    assert bool(said) == warns and (("restart the server" in kp.describe()) == warns), (said, kp.describe())
    if warns:
        assert "60% of the CPUs" in said[0]


def test_auto_takes_the_faster_precision_on_a_stub_timing(monkeypatch):
    m = tiny_model()
    monkeypatch.setattr(kernels, "native_bf16", lambda device="cpu": True)
    kp = plan(m, "auto", measure=lambda g, r, c, w: 1.0 if w[0].precision == "bfloat16" else 2.0)
    # Without quality samples int8 is not tried: its cost is checked on the model itself.
    assert kp.precision == "bfloat16" and kp.precision_ms == {"float32": 4.0, "bfloat16": 2.0}
    assert m.head_kernel.packed.precision == "bfloat16"
    assert "int8 and w8a8 only with a quality check" in kp.reason
    kp = plan(m, "auto", measure=lambda g, r, c, w: 3.0 if w[0].precision == "bfloat16" else 2.0)
    assert kp.precision == "float32"
    # Without native bf16 the skinny kernel still reads bf16 weights (half the bytes): timed too.
    monkeypatch.setattr(kernels, "native_bf16", lambda device="cpu": False)
    kp = plan(m, "auto", measure=lambda g, r, c, w: 1.0 if w[0].precision == "bfloat16" else 2.0)
    assert kp.precision == "bfloat16" and set(kp.precision_ms) == {"float32", "bfloat16"}
    # ... and with neither, bf16 is not tried and an explicit bfloat16 warns that it cannot pay.
    monkeypatch.setattr(kernels.SKINNY, "load", lambda: False)
    monkeypatch.setattr(kernels, "available", lambda precision: ["torch", "torch_wt"])
    kp = plan(m, "auto", measure=lambda g, r, c, w: 1.0 if w[0].precision == "bfloat16" else 2.0)
    assert kp.precision == "float32" and set(kp.precision_ms) == {"float32"}
    with pytest.warns(RuntimeWarning, match="no faster than --dtype float32"):
        plan(m, "bfloat16", measure=lambda g, r, c, w: 1.0)
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        plan(m, "float16")


def test_auto_checks_each_faster_precision_s_quality_on_the_model(monkeypatch):
    """auto walks the precisions from the fastest and takes the first whose KL from float32's
    predictions on the samples is within QUALITY_BOUNDS; the predictions are the model's own,
    computed with each precision's kernels installed."""
    m = tiny_model()
    samples = {"code": list(range(5, 40)), "prose": list(range(100, 130))}
    speed = {"w8a8": 0.5, "int8": 1.0, "bfloat16": 2.0, "float32": 3.0}
    seen = []
    real_logprobs, real_cost = kernels.sample_logprobs, kernels.quality_cost

    def logprobs(model, smp):
        seen.append("float32" if model.head_kernel is None else model.head_kernel.packed.precision)
        return real_logprobs(model, smp)  # the real thing runs, through the installed kernels

    def cost(over):
        return lambda base, other: {d: v + over.get(seen[-1], 0.0) for d, v in real_cost(base, other).items()}

    monkeypatch.setattr(kernels, "sample_logprobs", logprobs)
    monkeypatch.setattr(kernels, "quality_cost", cost({"int8": 0.03, "w8a8": 0.05}))
    kp = plan(m, "auto", samples=samples, measure=lambda g, r, c, w: speed[w[0].precision])
    assert seen == ["float32", "w8a8", "int8", "bfloat16"] and kp.precision == "bfloat16"
    assert "int8 costs" in kp.reason and "(over 0.02)" in kp.reason and "(within 0.005)" in kp.reason
    assert m.head_kernel.packed.precision == "bfloat16"
    seen.clear()
    monkeypatch.setattr(kernels, "quality_cost", cost({"w8a8": 0.05}))
    kp = plan(m, "auto", samples=samples, measure=lambda g, r, c, w: speed[w[0].precision])
    assert seen == ["float32", "w8a8", "int8"] and kp.precision == "int8"
    seen.clear()
    monkeypatch.setattr(kernels, "quality_cost", cost({}))
    kp = plan(m, "auto", samples=samples, measure=lambda g, r, c, w: speed[w[0].precision])
    assert seen == ["float32", "w8a8"] and kp.precision == "w8a8"
    seen.clear()
    speed["float32"] = 0.5  # fastest: nothing to check
    kp = plan(m, "auto", samples=samples, measure=lambda g, r, c, w: speed[w[0].precision])
    assert seen == [] and kp.precision == "float32"


def test_quality_cost_is_kl_from_float32_and_ignores_the_far_tail():
    """The load-time cost is KL(float32 || precision) per token: zero for the same predictions,
    the textbook sum for a small case, and blind to a token float32 gives 1e-7. The loss on a
    sample whose next token is that one moves by nats, which is what made auto refuse w8a8 on
    the 6 x 256 default although its held-out loss rose 0.0015 nats."""
    import math
    p = torch.tensor([[0.7, 0.2, 0.1 - 1e-7, 1e-7]]).log()
    q = torch.tensor([[0.6, 0.3, 0.1 - 1e-7, 1e-7]]).log()
    want = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3)
    assert kernels.quality_cost({"d": p}, {"d": p}) == {"d": 0.0}
    assert kernels.quality_cost({"d": p}, {"d": q})["d"] == pytest.approx(want, rel=1e-4)
    tail = p.clone()
    tail[0, 3] += 3.0  # the far tail's logit moves by 3 nats
    tail = tail.log_softmax(-1)
    assert kernels.quality_cost({"d": p}, {"d": tail})["d"] < 1e-5
    assert abs(F.nll_loss(tail, torch.tensor([3])) - F.nll_loss(p, torch.tensor([3]))) > 2.9


def test_quality_samples_and_their_loss_are_real():
    from treespec.model import load_bundle

    bundle = load_bundle(Path(__file__).resolve().parents[1] / "models" / "default")
    smp = kernels.quality_samples(bundle.tokenizer)
    assert set(smp) == {"code", "prose"} and all(len(v) >= 150 for v in smp.values())
    assert bundle.tokenizer.decode(smp["code"]).startswith('"""Text wrapping and filling.')
    bundle.model.set_kernels(None)
    loss = kernels.sample_loss(bundle.model, smp)
    # Real losses of a trained model: each at least 3 nats below a uniform guess (ln 50257),
    # and its training domain's (the standard library) the lower.
    import math
    assert all(v < math.log(50257) - 3 for v in loss.values()) and loss["code"] < loss["prose"]


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_forward_at_each_precision_agrees_with_fp32(precision):
    """A tiny model's logits under the kernels: equal to torch's fp32 within the precision's
    tolerance, and equal to a model whose weights were rounded the same way, run by torch."""
    m = tiny_model(seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = m.forward_step(ids, 0, m.new_cache()).logits
    plan(m, precision)
    got = m.forward_step(ids, 0, m.new_cache()).logits
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= {"float32": 1e-5, "bfloat16": 0.02, "int8": 0.04,
                                              "w8a8": 0.06}[precision] * scale
    # The same rounding applied to the weights, then torch's own kernels: the same logits
    # (bf16: oneDNN's bf16 GEMM, which the chooser may take for a prompt's rows, rounds the
    # activations too).
    rounded = tiny_model(seed=3)
    rounded.load_state_dict(m.state_dict())
    with torch.no_grad():
        for mod in rounded.blocks.modules():
            if isinstance(mod, gpt.Linear):
                mod.weight.copy_(Packed.of(mod.weight, None, precision).dequantized())
        head = Packed.of(rounded.exit_heads[-1].weight, None, precision).dequantized()
    rounded.exit_heads[-1].weight = torch.nn.Parameter(head)
    # ... and the KV cache in the precision's element type (bf16 below fp32), through torch.
    assert m.kv_dtype == kernels.KV_CACHE[precision] and m.new_cache().k[0].dtype == m.kv_dtype
    rounded.kv_dtype = m.kv_dtype
    want = rounded.forward_step(ids, 0, rounded.new_cache()).logits
    # bf16 and w8a8 also round activations (oneDNN's bf16 GEMM; w8a8's int8 rows)
    tol = {"bfloat16": 2e-2, "w8a8": 4e-2}.get(precision, 1e-4)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    # Training ignores the kernels: gradients flow through F.linear on the fp32 weights.
    m.train()
    out = m(ids, targets=ids)
    out.loss.backward()
    assert m.blocks[0].mlp.c_fc.weight.grad is not None


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_speculation_is_lossless_at_each_precision(precision):
    """Greedy output with a drafter equals vanilla decoding at the same precision (an oracle
    that is right for a varying number of positions, then wrong, forces multi-row verify
    steps and rollbacks), and a seeded sampled request gives the same tokens with a drafter."""
    from test_loop import Oracle

    tok = Tokenizer()
    m = tiny_model(seed=5)
    plan(m, precision)
    prompt = tok.encode("the cat sat on the mat. the cat sat on the mat. the cat")
    greedy = SamplingParams(max_new_tokens=24)
    ref = generate_all(m, prompt, greedy, None, tokenizer=tok)
    oracle = Oracle(ref.token_ids, len(prompt), 4, "partial")
    spec = generate_all(m, prompt, greedy, oracle, tokenizer=tok)
    assert spec.token_ids == ref.token_ids
    assert spec.stats.accepted_tokens > 0 and spec.stats.accepted_tokens < spec.stats.draft_tokens
    # The case that once broke: bf16 with torch's GEMM (which rounds activations to bf16)
    # timed fastest for a verify step's rows but not for one row; a token flipped.
    plan(m, precision, measure=lambda g, rows, c, w: {"torch": 1.0 if rows > 1 else 3.0}.get(c, 2.0))
    for text in ("Hello there", "the cat sat on the mat. the cat"):
        ids = tok.encode(text)
        ref = generate_all(m, ids, SamplingParams(max_new_tokens=40), None, tokenizer=tok)
        spec = generate_all(m, ids, SamplingParams(max_new_tokens=40), NgramDrafter(k_max=4), tokenizer=tok)
        assert spec.token_ids == ref.token_ids
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, seed=11)
    ref = generate_all(m, prompt, sampled, None, tokenizer=tok)
    spec = generate_all(m, prompt, sampled, NgramDrafter(k_max=4), tokenizer=tok)
    assert spec.token_ids == ref.token_ids and spec.stats.draft_tokens > 0


def test_set_kernels_none_restores_torch():
    m = tiny_model()
    ids = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = m.forward_step(ids, 0, m.new_cache()).logits
    plan(m, "int8")
    assert not torch.equal(m.forward_step(ids, 0, m.new_cache()).logits, ref)
    m.set_kernels(None)
    assert m.head_kernel is None and m.blocks[0].attn.c_attn.kernel is None
    assert torch.equal(m.forward_step(ids, 0, m.new_cache()).logits, ref)


def test_load_for_inference_refuses_what_it_cannot_run(tiny_bundle):
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, int8"):
        kernels.load_for_inference(tiny_bundle, "float16")
    with pytest.raises(ValueError, match="int8 has no kernel on cuda"):
        kernels.load_for_inference(tiny_bundle, "int8", device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle, kp = kernels.load_for_inference(tiny_bundle, "int8")
    assert kp.precision == "int8" and bundle.model.head_kernel.packed.precision == "int8"
    assert kp.to_dict()["choices"]["head"]["1"] in ("torch", "skinny")


def test_greedy_argmax_and_log_sum_exp_match_torch(monkeypatch):
    """The compiled pass over strided rows (the head's padded width): the first index of the
    maximum exactly, ties included, and the log-sum-exp within 2e-6 of float64's."""
    g = torch.Generator().manual_seed(0)
    for t in range(60):
        rows = 1 + t % 7
        full = torch.randn(rows, 50304, generator=g) * (0.5 + t % 9)
        x = full[:, :50257 - t % 3]  # strided rows, and lengths that leave a tail after the vectors
        if t % 4 == 0:
            x[:, 777] = x.max() + 1.0
            x[:, 40001] = x[:, 777]  # a tie: the first index wins, as torch's argmax
        idx, lse = kernels.argmax_logsumexp(x)
        assert idx == x.argmax(dim=-1).tolist()
        ref = torch.logsumexp(x.double(), dim=-1)
        assert ((lse.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() < 2e-6
    monkeypatch.setattr(kernels.SKINNY, "load", lambda: False)  # torch where the kernel is missing
    idx, lse = kernels.argmax_logsumexp(x)
    assert idx == x.argmax(dim=-1).tolist() and torch.allclose(lse, torch.logsumexp(x, dim=-1))


def test_the_fused_block_s_gelu_matches_torch_s_erf_gelu():
    """csrc/skinny.c's vectorised erf (a rational fit, clamped at |x| = 4) against float64:
    within 2e-6 absolute everywhere, and about as close as torch's own fp32 GELU."""
    assert SKINNY.load(), SKINNY.error
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3])
    got = x.clone()
    SKINNY.lib.gelu_erf_rows(got.data_ptr(), got.numel())
    want = F.gelu(x.double())
    assert (got.double() - want).abs().max().item() < 2e-6
    assert (got.double() - want).abs().mean().item() < 4 * (F.gelu(x).double() - want).abs().mean().item() + 1e-9


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_the_fused_trunk_computes_what_the_fused_blocks_compute(precision):
    """One C call for the trunk (embedding, blocks, final LayerNorm, head) against one call
    per block: the same residual streams at every exit, the same logits, in a decode step, a
    verify step and a batched forward; with skips and DWA too."""
    m = tiny_model(seed=7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plan(m, precision, measure=lambda g, rows, c, w: 1.0 if c == "skinny" else 2.0)
    assert m.fused_trunk is not None
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))

    def run(trunk):
        m.fused_trunk = trunk
        cache = m.new_cache()
        outs = [m.forward_step(ids[:, :9], 0, cache), m.forward_step(ids[:, 9:10], 9, cache),
                m.forward_step(ids[:, 10:], 10, cache)]
        other = m.new_cache()
        m.forward_step(ids[:, :5], 0, other)
        outs += m.forward_batch([(ids[:, 11:], 11, cache, False), (ids[:, 5:8], 5, other, False)])
        return outs

    trunk = m.fused_trunk
    with_trunk = run(trunk)
    for out in with_trunk:  # the head ran in the same C call, with the head's own kernel
        assert torch.equal(out.logits, m.head_kernel(out.hidden))
    last = m.forward_step(ids, 0, m.new_cache(), last_only=True)  # a prefill: the last row's logits only
    assert last.logits.shape == (1, 1, m.config.vocab_size) and torch.equal(last.logits, m.head_kernel(last.hidden))
    for a, b in zip(with_trunk, run(None)):
        for ha, hb in zip(a.exit_hidden, b.exit_hidden):
            assert torch.equal(ha, hb)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    # What a model has between its blocks (skips, DWA) runs inside the same C call.
    from test_skips import move_skips

    for kw in (dict(dwa=True), dict(dwa=True, dwa_dilation=2, dwa_period=2), dict(embed_skip=True, unet_skip=True),
               dict(embed_skip=True, unet_skip=True, dwa=True)):
        other = tiny_model(seed=7, **kw)
        move_skips(other)
        plan(other, precision, measure=lambda g, rows, c, w: 1.0 if c == "skinny" else 2.0)
        assert other.fused_trunk is not None, kw
        m, trunk = other, other.fused_trunk
        for a, b in zip(run(trunk), run(None)):
            for ha, hb in zip(a.exit_hidden, b.exit_hidden):
                torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_a_prompt_past_the_last_bucket_runs_in_one_c_call_as_decode_chunks_would(precision):
    """A prompt longer than the last row bucket takes that bucket's kernel, here the C one:
    the whole trunk in one call, and each row's result is what feeding the prompt in decode
    steps of 16 gives, bit for bit (w8a8 rounds a prompt's activations as a decode step's)."""
    T = ROW_BUCKETS[-1] + 40
    m = tiny_model(seed=3, block_size=T + 8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plan(m, precision, measure=lambda g, rows, c, w: 1.0 if c == "skinny" else 2.0)
    calls = []
    trunk = m.fused_trunk

    def counted(idx, *a, **kw):
        calls.append(idx.shape[-1])
        return trunk(idx, *a, **kw)

    m.fused_trunk = counted
    m.fused_trunk.handles = trunk.handles
    ids = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = m.forward_step(ids, 0, m.new_cache(), last_only=True)
        assert calls == [T]
        cache = m.new_cache()
        for s in range(0, T, 16):
            step = m.forward_step(ids[:, s:s + 16], s, cache)
    assert torch.equal(whole.hidden[0, -1], step.hidden[0, -1])
    for a, b in zip(whole.exit_hidden, step.exit_hidden):
        assert torch.equal(a[0, -1], b[0, -1])
    assert torch.equal(whole.logits[0, -1], step.logits[0, -1])


def test_the_kv_cache_rounds_to_bf16_as_torch_does():
    """The fused block writes bf16 keys and values with csrc/skinny.c's rounding; torch's
    path writes a prompt's with .to(bfloat16). Both must give the same bits, ties and all."""
    assert SKINNY.load(), SKINNY.error
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=g) * 10, torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5,
                                                                          1e-40, 3e38, float("inf"), 0.0, -0.0])])
    got = torch.empty(x.numel(), dtype=torch.bfloat16)
    SKINNY.lib.round_bf16(x.data_ptr(), got.data_ptr(), x.numel())
    assert torch.equal(got.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    m = tiny_model(seed=2)
    plan(m, "float32")
    assert m.kv_dtype == torch.float32
    w = plan(m, "w8a8")
    assert (w.kv_cache, w.fused) == ("bfloat16", "trunk") and "KV cache bfloat16" in w.describe()
    assert w.to_dict()["kv_cache"] == "bfloat16"
    m.set_kernels(None)
    assert m.kv_dtype is None and m.new_cache().k[0].dtype == torch.float32


@pytest.mark.parametrize("precision", ["float32", "w8a8"])
@pytest.mark.parametrize("n_embd", [128, 32, 24])
def test_verify_rows_equal_one_token_forwards_bit_for_bit(precision, n_embd):
    """The C trunk's attention reads a sequence's cache once for all its rows (widening a bf16
    cache once); each row must still get exactly what a one-token forward gives, or a verify
    step could flip a token that vanilla decoding keeps. Head sizes 64 and 16 take the vector
    path (64 its eight-register sums), 12 the plain loop; fp32 has an fp32 cache, w8a8 bf16."""
    m = tiny_model(seed=9, n_embd=n_embd, n_head=2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plan(m, precision, measure=lambda g, rows, c, w: 1.0 if c == "skinny" else 2.0)
    assert m.fused_trunk is not None
    ids = torch.randint(0, 50257, (1, 28), generator=torch.Generator().manual_seed(2))
    one = m.new_cache()
    m.forward_step(ids[:, :20], 0, one)
    singles = torch.cat([m.forward_step(ids[:, i:i + 1], i, one).logits for i in range(20, 28)], dim=1)
    rows = m.new_cache()
    m.forward_step(ids[:, :20], 0, rows)
    verify = m.forward_step(ids[:, 20:], 20, rows).logits
    assert torch.equal(verify, singles)
    # and in a batched forward beside another sequence's rows
    other = m.new_cache()
    m.forward_step(ids[:, :7], 0, other)
    rows.length = 20
    batched = m.forward_batch([(ids[:, 7:12], 7, other, False), (ids[:, 20:], 20, rows, False)])
    assert torch.equal(batched[1].logits, singles)
    # and what torch's attention gives, within rounding
    m.fused_trunk = None
    for b in m.blocks:
        b.fused = None
    ref = m.new_cache()
    m.forward_step(ids[:, :20], 0, ref)
    torch.testing.assert_close(m.forward_step(ids[:, 20:], 20, ref).logits, verify, rtol=1e-3, atol=1e-3)


def test_logit_stats_match_the_numpy_reference():
    """The tree drafter's per-proposal statistics of a logits row (top columns with ties to the
    lower column, log-normaliser, entropy) computed in C equal the NumPy reference: the same
    columns and values (NumPy orders the ties of a flat row, an untrained model's, its own
    way), the sums within float rounding."""
    import numpy as np

    from treespec.draft.features import _vocab_stats

    rng = np.random.default_rng(0)
    rows = rng.normal(0, 3, size=(6, 50257)).astype(np.float32)
    rows[1, [7, 900, 4000]] = rows[1].max() + 1.0  # a three-way tie at the top: lower columns first
    rows[2] = 0.0  # flat: every column ties
    rows[3, 50250:] = 40.0  # the largest at the tail, past the last full vector
    rows[4, :3] = 40.0  # and at the head
    got = kernels.logit_stats(rows, 4)
    assert got is not None
    top, vals, log_s, entropy = got
    for r in range(rows.shape[0]):
        want = _vocab_stats(rows[r], 4)
        exact = np.lexsort((np.arange(rows.shape[1]), -rows[r]))[:4]  # by value, then by column
        assert top[r].tolist() == exact.tolist(), r
        assert vals[r].tolist() == rows[r, exact].astype(np.float64).tolist()
        if r != 2:  # NumPy's flat-row search breaks ties in its own (deterministic) order
            assert top[r].tolist() == want[0].tolist(), r
        assert abs(log_s[r] - want[2]) <= 1e-5 * max(1.0, abs(want[2]))
        assert abs(entropy[r] - want[3]) <= 1e-4 * max(1.0, abs(want[3]))
    assert top[1, :3].tolist() == [7, 900, 4000] and top[2].tolist() == [0, 1, 2, 3]
    assert kernels.logit_stats(rows[:, :3], 4) is None  # fewer columns than asked: the caller's NumPy path


def test_exit_scores_match_the_numpy_reference(monkeypatch):
    """An intermediate exit's logits for a few tokens per row, compiled, equal the NumPy path
    (float64 LayerNorm and dot products) and the model's own exit_logits."""
    import numpy as np

    from treespec.draft import features

    m = tiny_model(seed=4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    h = torch.randn(3, m.config.n_embd)
    top = torch.tensor([[5, 9, 100, 2000], [1, 1, 50256, 7], [0, 3, 4, 5]])
    got = features._exit_scores(m, 0, h, top)
    monkeypatch.setattr(features, "exit_scores", lambda *a, **k: None)
    want = features._exit_scores(m, 0, h, top)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        full = m.exit_logits(0, h).double().numpy()
    np.testing.assert_allclose(got, np.take_along_axis(full, top.numpy(), axis=1), rtol=1e-4, atol=1e-4)


def test_packed_weights_move_into_one_huge_page_block():
    """The plan moves the served weights into one block of memory that asks for 2 MB pages:
    the same values, each weight on its own cache line, the first on a 2 MB boundary, and
    the kernels read the moved copies (the logits do not change)."""
    m = tiny_model(seed=2)
    ids = torch.randint(0, 50257, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = m.forward_step(ids, 0, m.new_cache()).logits
    weights = [torch.randn(48, 32), torch.randn(7, 5), torch.randn(300, 32)]
    packed = {"trunk": [Packed.of(w, None, "int8") for w in weights[:2]], "head": [Packed.of(weights[2], None, "bfloat16")]}
    before = [p.weight.clone() for ps in packed.values() for p in ps]
    assert kernels._in_huge_pages(packed)  # Linux (what treespec serves on) has madvise(MADV_HUGEPAGE)
    after = [p.weight for ps in packed.values() for p in ps]
    assert all(torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape for a, b in zip(after, before))
    assert after[0].data_ptr() % kernels.HUGE_PAGE == 0
    assert all(a.data_ptr() % 64 == 0 and a.is_contiguous() for a in after)
    assert len({a.untyped_storage().data_ptr() for a in after}) == 1  # one block
    p = plan(m, "float32")
    assert p.huge_pages and p.to_dict()["huge_pages"] and "2 MB pages" in p.describe()
    torch.testing.assert_close(m.forward_step(ids, 0, m.new_cache()).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_prefetching_changes_no_result_and_is_chosen_by_timing(precision):
    """Asking for weight rows ahead changes only when bytes arrive: the same products bit for
    bit. The plan sets it for each decode bucket where a pass timed faster with it (a stub
    timing here: faster ahead at 1 and 2 rows, slower beyond), for every row count in it."""
    assert SKINNY.load()
    x = torch.randn(5, 64)
    p = Packed.of(torch.randn(200, 64), torch.randn(200), precision)
    ahead = kernels.PREFETCH_ROWS
    try:
        SKINNY.lib.skinny_set_prefetch(5, 0)
        plain = CANDIDATES["skinny"](x, p)
        SKINNY.lib.skinny_set_prefetch(5, ahead)
        assert torch.equal(CANDIDATES["skinny"](x, p), plain)

        def stub(g, rows, c, w):
            if c != "skinny":
                return 3.0
            on = SKINNY.lib.skinny_get_prefetch(rows) > 0
            return (1.0 if on else 2.0) if rows <= 2 else (2.0 if on else 1.0)

        got = plan(tiny_model(seed=1), precision, measure=stub)
        assert got.prefetch == {1: ahead, 2: ahead, 4: 0, 8: 0, 16: 0}
        assert got.prefetch_ms[1] == {0: 2.0 * len(got.choices), ahead: 1.0 * len(got.choices)}
        assert [SKINNY.lib.skinny_get_prefetch(r) for r in (1, 2, 3, 8, 16, 17, 64)] == [ahead, ahead, 0, 0, 0, 0, 0]
        assert "prefetch ahead at rows [1, 2]" in got.describe() and got.to_dict()["prefetch"]["1"] == ahead
    finally:
        for r in range(65):
            SKINNY.lib.skinny_set_prefetch(r, 0)
