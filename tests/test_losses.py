"""Tests for pldistill_cli.losses against independent float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pldistill_cli.losses import aw_cka, aw_cka_gram, bucketed_kl, full_kl, topk_logprobs


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------- references


def ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Standard linear CKA with an explicit centring matrix H = I - 11^T / n."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_weighted_cka(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """G = W^1/2 C X X^T C^T W^1/2, C = I - 1 w^T; CKA = <Gx, Gy> / (|Gx| |Gy|)."""
    x, y, w = x.astype(np.float64), y.astype(np.float64), w.astype(np.float64)
    w = w / w.sum()
    n = x.shape[0]
    c = np.eye(n) - np.outer(np.ones(n), w)
    sw = np.diag(np.sqrt(w))
    gx = sw @ c @ x @ x.T @ c.T @ sw
    gy = sw @ c @ y @ y.T @ c.T @ sw
    return float((gx * gy).sum() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_bucketed_kl(
    student: np.ndarray,  # [L, V]
    teacher_p: np.ndarray,  # [L, V] teacher probabilities over the student's vocabulary
    ids: np.ndarray,  # [L, k] bucket ids (< V)
    temperature: float,
) -> float:
    """Mean over positions of T^2 * bucketed KL, from dense float64 distributions."""
    q = np.exp(_log_softmax(student / temperature))
    out = []
    for pos in range(student.shape[0]):
        i = ids[pos]
        pk, qk = teacher_p[pos, i], q[pos, i]
        r, q_tail = 1.0 - pk.sum(), 1.0 - qk.sum()
        kl = float((pk * np.log(pk / qk)).sum())
        if r > 1e-12:
            kl += r * np.log(r / q_tail)
        out.append(kl)
    return float(np.mean(out)) * temperature**2


def ref_full_kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    lp, lq = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()) * temperature**2


def _random_orthogonal(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q.float()


# ----------------------------------------------------------------------------- AW-CKA


@pytest.mark.parametrize("t,ds,dt", [(12, 5, 7), (6, 48, 64), (60, 4, 6)])
def test_uniform_weights_is_linear_cka(t: int, ds: int, dt: int) -> None:
    # Shapes exercise both the T x T Gram route and the D x D cross-product route.
    x, y = torch.randn(3, t, ds), torch.randn(3, t, dt)
    y[..., :ds] += x  # correlated, so the value is not trivially small
    out = aw_cka(x, y, torch.ones(3, t))
    for b in range(3):
        assert out[b].item() == pytest.approx(ref_linear_cka(x[b].numpy(), y[b].numpy()), abs=1e-5)


@pytest.mark.parametrize("t,ds,dt", [(12, 5, 7), (6, 48, 64), (60, 4, 6)])
def test_weighted_matches_reference(t: int, ds: int, dt: int) -> None:
    x, y = torch.randn(3, t, ds), torch.randn(3, t, dt)
    y[..., :ds] += 0.5 * x
    w = torch.rand(3, t) ** 3  # strongly non-uniform
    out = aw_cka(x, y, w)
    for b in range(3):
        ref = ref_weighted_cka(x[b].numpy(), y[b].numpy(), w[b].numpy())
        assert out[b].item() == pytest.approx(ref, abs=1e-5)


def test_invariances_give_one() -> None:
    x = torch.randn(2, 20, 16)
    w = torch.rand(2, 20) ** 2
    q = _random_orthogonal(16)
    offset = 3.0 * torch.randn(16)
    variants = {
        "identical": x,
        "orthogonal": x @ q,
        "scaling": 7.5 * x,
        "offset": x + offset,
        "combined": 0.2 * (x @ q) + offset,
    }
    for name, y in variants.items():
        out = aw_cka(x, y, w)
        assert torch.allclose(out, torch.ones(2), atol=1e-5), name
        assert torch.allclose(aw_cka(y, x, w), torch.ones(2), atol=1e-5), name


def test_not_invariant_to_reweighting_steps() -> None:
    # Sanity: weights matter (otherwise the weighted tests would be vacuous).
    x, y = torch.randn(1, 15, 6), torch.randn(1, 15, 6)
    a = aw_cka(x, y, torch.ones(1, 15))
    b = aw_cka(x, y, torch.rand(1, 15) ** 4)
    assert (a - b).abs().item() > 1e-3


def test_padding_does_not_change_result() -> None:
    t, pad = 10, 6
    x, y, w = torch.randn(2, t, 5), torch.randn(2, t, 9), torch.rand(2, t)
    base = aw_cka(x, y, w)
    xp = torch.cat([x, 1e4 * torch.randn(2, pad, 5)], dim=1)
    yp = torch.cat([y, 1e4 * torch.randn(2, pad, 9)], dim=1)
    wp = torch.cat([w, 100 * torch.rand(2, pad)], dim=1)
    mask = torch.cat([torch.ones(2, t), torch.zeros(2, pad)], dim=1).bool()
    assert torch.allclose(aw_cka(xp, yp, wp, mask), base, atol=1e-5)
    assert torch.allclose(aw_cka_gram(xp, yp @ yp.mT, wp, mask), base, atol=1e-5)


def test_batch_of_different_lengths() -> None:
    lengths, t_max = [5, 9, 12], 12
    xs = [torch.randn(n, 4) for n in lengths]
    ys = [torch.randn(n, 30) for n in lengths]
    ws = [torch.rand(n) for n in lengths]
    x = 50 * torch.randn(3, t_max, 4)
    y = 50 * torch.randn(3, t_max, 30)
    w = torch.rand(3, t_max)
    mask = torch.zeros(3, t_max, dtype=torch.bool)
    for b, n in enumerate(lengths):
        x[b, :n], y[b, :n], w[b, :n], mask[b, :n] = xs[b], ys[b], ws[b], True
    out = aw_cka(x, y, w, mask)
    for b in range(3):
        single = aw_cka(xs[b][None], ys[b][None], ws[b][None])
        assert out[b].item() == pytest.approx(single.item(), abs=1e-5)
        ref = ref_weighted_cka(xs[b].numpy(), ys[b].numpy(), ws[b].numpy())
        assert out[b].item() == pytest.approx(ref, abs=1e-5)


def test_different_widths_in_unit_interval() -> None:
    x, y, w = torch.randn(8, 25, 8), torch.randn(8, 25, 32), torch.rand(8, 25)
    out = aw_cka(x, y, w)
    assert out.shape == (8,) and out.dtype == torch.float32
    assert bool(((out >= -1e-6) & (out <= 1 + 1e-6)).all())
    for b in range(8):
        ref = ref_weighted_cka(x[b].numpy(), y[b].numpy(), w[b].numpy())
        assert out[b].item() == pytest.approx(ref, abs=1e-5)


def test_zero_weights_fall_back_to_uniform() -> None:
    x, y = torch.randn(2, 10, 4), torch.randn(2, 10, 6)
    w = torch.rand(2, 10)
    w[1] = 0.0
    out = aw_cka(x, y, w)
    assert out[1].item() == pytest.approx(ref_linear_cka(x[1].numpy(), y[1].numpy()), abs=1e-5)
    assert out[0].item() == pytest.approx(ref_weighted_cka(x[0].numpy(), y[0].numpy(), w[0].numpy()), abs=1e-5)


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
@pytest.mark.parametrize("gram", [False, True])
def test_constant_features_zero_with_finite_grads(which: str, gram: bool) -> None:
    t = 12
    x, y = torch.randn(2, t, 6), torch.randn(2, t, 10)
    if which in ("student", "both"):
        x = (3.7 * torch.randn(2, 1, 6)).expand(2, t, 6).clone()
    if which in ("teacher", "both"):
        y = (2.1 * torch.randn(2, 1, 10)).expand(2, t, 10).clone()
    x.requires_grad_(True)
    w = torch.rand(2, t)
    out = aw_cka_gram(x, y @ y.mT, w) if gram else aw_cka(x, y, w)
    assert torch.equal(out.detach(), torch.zeros(2))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_all_zero_features_are_handled() -> None:
    x = torch.zeros(1, 8, 4, requires_grad=True)
    out = aw_cka(x, torch.randn(1, 8, 5), torch.rand(1, 8))
    out.sum().backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all()


def test_gradient_flows_to_student() -> None:
    x = torch.randn(2, 16, 8, requires_grad=True)
    y, w = torch.randn(2, 16, 12), torch.rand(2, 16)
    for fn in (lambda: aw_cka(x, y, w), lambda: aw_cka_gram(x, y @ y.mT, w)):
        x.grad = None
        fn().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    x = torch.randn(1, 7, 3, dtype=torch.float64)
    y, w = torch.randn(1, 7, 4, dtype=torch.float64), torch.rand(1, 7, dtype=torch.float64)
    x.requires_grad_(True)
    aw_cka(x, y, w).sum().backward()
    grad, h = x.grad.clone(), 1e-3
    for idx in [(0, 0, 0), (0, 3, 1), (0, 6, 2)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[idx] += h
        xm[idx] -= h
        fd = (aw_cka(xp, y, w) - aw_cka(xm, y, w)).item() / (2 * h)
        assert grad[idx].item() == pytest.approx(fd, abs=2e-3)


def test_bf16_autocast_computes_in_float32() -> None:
    x, y, w = torch.randn(2, 30, 16), torch.randn(2, 30, 24), torch.rand(2, 30)
    y[..., :16] += x
    xb, yb = x.bfloat16().requires_grad_(True), y.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aw_cka(xb, yb, w.bfloat16())
        out_gram = aw_cka_gram(xb, yb @ yb.mT, w.bfloat16())
    assert out.dtype == torch.float32 and out_gram.dtype == torch.float32
    # Same (bf16-rounded) inputs computed in plain fp32: agreement to fp32 precision.
    ref = aw_cka(xb.detach().float(), yb.float(), w.bfloat16().float())
    assert torch.allclose(out, ref, atol=1e-5)
    # Close to the unrounded fp32 result (bf16 input rounding only).
    assert torch.allclose(out, aw_cka(x, y, w), atol=2e-2)
    # Teacher Gram formed in bf16 under autocast is itself rounded: looser tolerance.
    assert torch.allclose(out_gram, ref, atol=2e-2)
    out.sum().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()


@pytest.mark.parametrize("t,ds,dt", [(14, 5, 9), (6, 40, 50)])
def test_gram_variant_equals_feature_variant(t: int, ds: int, dt: int) -> None:
    b = 4
    x, y = torch.randn(b, t, ds), torch.randn(b, t, dt) + 2.0
    y[..., :ds] += x
    w = torch.rand(b, t) ** 2
    w[2] = 0.0  # uniform fall-back
    mask = torch.rand(b, t) > 0.3
    mask[:, 0] = True
    mask[3] = True
    for m in (None, mask):
        a = aw_cka(x, y, w, m)
        g = aw_cka_gram(x, y @ y.mT, w, m)
        assert torch.allclose(a, g, atol=1e-5), (a, g)


# ----------------------------------------------------------------------------- bucketed KL


def _logits(b: int, l: int, v: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(b, l, v)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_kl_matches_reference(temperature: float) -> None:
    s, t = _logits(2, 5, 11), _logits(2, 5, 11)
    out = full_kl(s, t, torch.ones(2, 5, dtype=torch.bool), temperature)
    for b in range(2):
        ref = ref_full_kl(s[b].numpy(), t[b].numpy(), temperature)
        assert out[b].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_topk_logprobs() -> None:
    t = _logits(2, 3, 13)
    ids, lp = topk_logprobs(t.bfloat16(), 4, temperature=1.5)
    dense = torch.log_softmax(t.bfloat16().float() / 1.5, dim=-1)
    assert ids.shape == lp.shape == (2, 3, 4) and lp.dtype == torch.float32
    assert torch.allclose(lp, dense.gather(-1, ids))
    assert torch.allclose(lp, dense.topk(4, dim=-1).values)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_all_ids_equals_full_kl(temperature: float) -> None:
    v = 17
    s, t = _logits(3, 6, v), _logits(3, 6, v)
    mask = torch.ones(3, 6, dtype=torch.bool)
    out = bucketed_kl(s, *topk_logprobs(t, v, temperature), mask, temperature)
    assert torch.allclose(out, full_kl(s, t, mask, temperature), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 10, 19])
def test_lower_bound_of_full_kl(k: int) -> None:
    v = 20
    s, t = _logits(4, 8, v), _logits(4, 8, v)
    mask = torch.ones(4, 8, dtype=torch.bool)
    for temperature in (1.0, 3.0):
        out = bucketed_kl(s, *topk_logprobs(t, k, temperature), mask, temperature)
        full = full_kl(s, t, mask, temperature)
        assert bool((out >= -1e-6).all())
        assert bool((out <= full + 1e-5).all())


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_numpy_reference(k: int, temperature: float) -> None:
    v = 15
    s, t = _logits(2, 5, v), _logits(2, 5, v)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ids, lp = topk_logprobs(t, k, temperature)
    out = bucketed_kl(s, ids, lp, mask, temperature)
    for b in range(2):
        teacher_p = np.exp(_log_softmax(t[b].numpy() / temperature))
        ref = ref_bucketed_kl(s[b].numpy(), teacher_p, ids[b].numpy(), temperature)
        assert out[b].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_zero_for_identical_logits(k: int) -> None:
    t = _logits(2, 6, 12)
    mask = torch.ones(2, 6, dtype=torch.bool)
    for temperature in (1.0, 2.0):
        out = bucketed_kl(t, *topk_logprobs(t, k, temperature), mask, temperature)
        assert torch.allclose(out, torch.zeros(2), atol=1e-5)


def test_teacher_ids_beyond_student_vocab_are_dropped() -> None:
    v, extra, k, temperature = 14, 5, 9, 1.5
    s = _logits(2, 4, v)
    t = _logits(2, 4, v + extra)
    t[..., v:] += 6.0  # make the out-of-vocabulary ids part of the teacher's top-k
    ids, lp = topk_logprobs(t, k, temperature)
    assert bool((ids >= v).sum(-1).eq(extra).all())
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = bucketed_kl(s, ids, lp, mask, temperature)
    for b in range(2):
        # Reference: restrict the teacher to the first V ids and renormalise.
        p_full = np.exp(_log_softmax(t[b].numpy() / temperature))
        p_restricted = p_full[:, :v] / p_full[:, :v].sum(-1, keepdims=True)
        kept = np.stack([row[row < v] for row in ids[b].numpy()])
        ref = ref_bucketed_kl(s[b].numpy(), p_restricted, kept, temperature)
        assert out[b].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # With every teacher id cached, this is the dense KL of the restricted teacher.
    out_all = bucketed_kl(s, *topk_logprobs(t, v + extra, temperature), mask, temperature)
    assert torch.allclose(out_all, full_kl(s, t[..., :v], mask, temperature), atol=1e-5)


def test_masked_positions_do_not_matter() -> None:
    v, k, l, pad = 16, 4, 5, 3
    s, t = _logits(2, l, v), _logits(2, l, v)
    base = bucketed_kl(s, *topk_logprobs(t, k), torch.ones(2, l, dtype=torch.bool))
    ids, lp = topk_logprobs(t, k)
    s_pad = torch.cat([s, 1e3 * torch.randn(2, pad, v)], dim=1)
    ids_pad = torch.cat([ids, torch.randint(-5, 3 * v, (2, pad, k))], dim=1)
    lp_pad = torch.cat([lp, 50 * torch.randn(2, pad, k)], dim=1)
    mask = torch.cat([torch.ones(2, l), torch.zeros(2, pad)], dim=1).bool()
    s_pad.requires_grad_(True)
    out = bucketed_kl(s_pad, ids_pad, lp_pad, mask)
    assert torch.allclose(out, base, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(s_pad.grad).all()
    assert torch.equal(s_pad.grad[:, l:], torch.zeros_like(s_pad.grad[:, l:]))
    # Clip with no positions -> 0.
    none = bucketed_kl(s, ids, lp, torch.zeros(2, l, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2))


@pytest.mark.parametrize("k", [3, 16])
def test_gradient_finite_and_flows(k: int) -> None:
    v = 16
    s = _logits(2, 5, v).requires_grad_(True)
    t = _logits(2, 5, v)
    out = bucketed_kl(s, *topk_logprobs(t, k, 2.0), torch.ones(2, 5, dtype=torch.bool), 2.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_bf16_student_under_autocast() -> None:
    s, t = _logits(2, 5, 16), _logits(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    sb = s.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bucketed_kl(sb, *topk_logprobs(t, 4), mask)
    assert out.dtype == torch.float32
    ref = bucketed_kl(sb.detach().float(), *topk_logprobs(t, 4), mask)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(sb.grad.float()).all()


def test_top_k_from_hidden_states_in_chunks_equals_the_top_k_of_dense_logits():
    from pldistill_cli.forward import topk_from_hidden

    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(8, 50, bias=False), torch.randn(2, 7, 8)
    ids, logprobs = topk_from_hidden(head, hidden, 5, 2.0, positions=3)  # 14 positions in 5 chunks
    dense_ids, dense_logprobs = topk_logprobs(head(hidden), 5, 2.0)
    assert torch.equal(ids, dense_ids)
    torch.testing.assert_close(logprobs, dense_logprobs)
