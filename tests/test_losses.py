"""Tests for pldistill_cli.losses against independent float64 NumPy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pldistill_cli.losses import (aw_cka, aw_cka_encoded, aw_cka_gram, bucketed_kl, full_kl, teacher_factor,
                                  teacher_self_norm, teacher_side, topk_logprobs)


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


def ref_debiased_hsic(k: np.ndarray, l: np.ndarray, w: np.ndarray) -> float:
    """Weighted U-statistic, literally: sum over distinct (i, j, q, r) of w_i w_j w_q w_r h_ijqr
    divided by the sum of those weight products; h = k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    num = den = 0.0
    for i, j, q, r in itertools.permutations(range(len(w)), 4):
        p = w[i] * w[j] * w[q] * w[r]
        num += p * (k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
        den += p
    return num / den


def ref_debiased_cka(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """CKA from ref_debiased_hsic on the raw (uncentred) linear Grams, in float64."""
    x, y, w = x.astype(np.float64), y.astype(np.float64), w.astype(np.float64)
    k, l = x @ x.T, y @ y.T
    return ref_debiased_hsic(k, l, w) / np.sqrt(ref_debiased_hsic(k, k, w) * ref_debiased_hsic(l, l, w))


def ref_song_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA (Nguyen et al. 2021) from Song et al.'s (2012) closed-form HSIC_1."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[0]

    def hsic1(k: np.ndarray, l: np.ndarray) -> float:
        k, l, one = k - np.diag(np.diag(k)), l - np.diag(np.diag(l)), np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    return hsic1(k, l) / np.sqrt(hsic1(k, k) * hsic1(l, l))


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


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
@pytest.mark.parametrize("route", ["features", "gram", "encoded"])
def test_constant_features_zero_with_finite_grads(which: str, route: str, estimator: str) -> None:
    t = 12
    x, y = torch.randn(2, t, 6), torch.randn(2, t, 10)
    if which in ("student", "both"):
        x = (3.7 * torch.randn(2, 1, 6)).expand(2, t, 6).clone()
    if which in ("teacher", "both"):
        y = (2.1 * torch.randn(2, 1, 10)).expand(2, t, 10).clone()
    x.requires_grad_(True)
    w = torch.rand(2, t)
    encoded, weight, bias = torch.randn(2, t, 8), torch.randn(10, 8), torch.randn(10)
    if which in ("teacher", "both"):
        encoded = (2.1 * torch.randn(2, 1, 8)).expand(2, t, 8).clone()
    if route == "encoded":
        out = aw_cka_encoded(x, encoded, teacher_factor(weight, bias), w, estimator=estimator)
    elif route == "gram":
        out = aw_cka_gram(x, y @ y.mT, w, estimator=estimator)
    else:
        out = aw_cka(x, y, w, estimator=estimator)
    assert torch.equal(out.detach(), torch.zeros(2))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_constant_teacher_gram_is_degenerate(estimator: str) -> None:
    # The raw Gram of constant features is constant only up to float32 rounding of its entries;
    # centring it leaves a variance of up to ~1e-6 of the second moment, which must still count.
    for t, d in [(12, 10), (75, 64)]:
        y = (2.1 * torch.randn(64, 1, d) + 1.0).expand(64, t, d).contiguous()
        out = aw_cka_gram(torch.randn(64, t, 6), y @ y.mT, torch.rand(64, t), estimator=estimator)
        assert torch.equal(out, torch.zeros(64))


@pytest.mark.parametrize("route", ["features", "gram", "encoded"])
def test_a_variance_of_exactly_eps_times_the_second_moment_counts_as_constant(route: str) -> None:
    """The constant-clip rule is inclusive: variance AT MOST eps times the second moment. Dyadic data keep
    both exact in float32: under uniform weights the teacher (1, 1, 0, 0) has mean 1/2, second moment 1/2
    and variance 1/4, so eps = 1/2 sits exactly on the boundary (CKA 0); just below it the CKA is the
    float64 value. The student has weighted mean 0 (ratio 1), far from constant at either eps."""
    student = torch.tensor([[[1.0, 0.25], [0.5, -0.5], [-1.0, 0.25], [-0.5, 0.0]]])
    teacher = torch.tensor([[[1.0], [1.0], [0.0], [0.0]]])
    w = torch.ones(1, 4)
    expected = ref_weighted_cka(student[0].numpy(), teacher[0].numpy(), w[0].numpy())
    assert expected > 0.5  # about 0.91: a 0 below could only come from the constant-clip rule
    for eps, want in ((0.5, 0.0), (0.49, expected)):
        if route == "features":
            out = aw_cka(student, teacher, w, eps=eps)
        elif route == "gram":  # the raw Gram [[1, 1, 0, 0], [1, 1, 0, 0], 0, 0] centres exactly too
            out = aw_cka_gram(student, teacher @ teacher.mT, w, eps=eps)
        else:  # sides swapped (CKA is symmetric): the rule must hold for the student's side of a step too
            out = aw_cka_encoded(teacher, student, teacher_factor(torch.eye(2)), w, eps=eps)
        assert out.item() == pytest.approx(want, abs=1e-6), eps


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


# ----------------------------------------------------------------------------- debiased AW-CKA

# (t, ds, dt): aw_cka's debiased estimator takes the Gram route for the first two, the
# cross-product route for the last two.
DEBIASED_SHAPES = [(7, 3, 5), (6, 8, 12), (7, 2, 2), (7, 1, 2)]


@pytest.mark.parametrize("t,ds,dt", DEBIASED_SHAPES)
def test_debiased_matches_distinct_tuple_reference(t: int, ds: int, dt: int) -> None:
    # Offsets on both sides: the reference works on raw, uncentred Grams, the implementation
    # centres first, so agreement also shows the estimator is offset-invariant.
    x, y = torch.randn(3, t, ds) - 1.0, torch.randn(3, t, dt) + 1.5
    y[..., :1] += 0.7 * x[..., :1]
    w = 0.5 + torch.rand(3, t)
    out = aw_cka(x, y, w, estimator="debiased")
    out_gram = aw_cka_gram(x, y @ y.mT, w, estimator="debiased")
    for b in range(3):
        ref = ref_debiased_cka(x[b].numpy(), y[b].numpy(), w[b].numpy())
        # Few steps: the closed forms cancel more than the biased ones (see test_debiased_float32_*).
        assert out[b].item() == pytest.approx(ref, abs=1e-4)
        assert out_gram[b].item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("t,ds,dt", [(5, 3, 5), (12, 5, 7), (6, 48, 64), (60, 4, 6)])
def test_debiased_uniform_weights_is_song_estimator(t: int, ds: int, dt: int) -> None:
    x, y = torch.randn(3, t, ds), torch.randn(3, t, dt) + 1.5
    y[..., :ds] += x
    out = aw_cka(x, y, torch.ones(3, t), estimator="debiased")
    out_gram = aw_cka_gram(x, y @ y.mT, torch.ones(3, t), estimator="debiased")
    tol = 1e-4 if t < 10 else 1e-5  # few steps: float32 cancels more (see test_debiased_float32_*)
    for b in range(3):
        ref = ref_song_cka(x[b].numpy(), y[b].numpy())
        assert out[b].item() == pytest.approx(ref, abs=tol)
        assert out_gram[b].item() == pytest.approx(ref, abs=tol)


def test_debiased_tuple_reference_is_song_at_uniform_weights() -> None:
    # The two references agree with each other (guards the references themselves).
    x, y = np.random.default_rng(0).normal(size=(2, 7, 3))
    assert ref_debiased_cka(x, y, np.full(7, 0.3)) == pytest.approx(ref_song_cka(x, y), abs=1e-12)


@pytest.mark.parametrize("t,ds,dt", [(20, 16, 16), (80, 3, 3)])
def test_debiased_invariances(t: int, ds: int, dt: int) -> None:
    x, y = torch.randn(2, t, ds), torch.randn(2, t, dt)
    y = y + 0.8 * x
    w = torch.rand(2, t) ** 2
    base = aw_cka(x, y, w, estimator="debiased")
    q = _random_orthogonal(ds)
    offset = 3.0 * torch.randn(ds)
    variants = {
        "orthogonal": x @ q,
        "scaling": 7.5 * x,
        "offset": x + offset,
        "combined": 0.2 * (x @ q) + offset,
    }
    for name, v in variants.items():
        assert torch.allclose(aw_cka(x, v, w, estimator="debiased"), torch.ones(2), atol=1e-5), name
        assert torch.allclose(aw_cka(v, y, w, estimator="debiased"), base, atol=1e-5), name
        # A raw Gram dominated by an offset loses float32 digits when centred: looser.
        tol = 1e-5 if name in ("orthogonal", "scaling") else 3e-4
        assert torch.allclose(aw_cka_gram(y, v @ v.mT, w, estimator="debiased"), base, atol=tol), name


def test_debiased_padding_and_lengths() -> None:
    lengths, t_max = [5, 6, 7], 9
    xs = [torch.randn(n, 3) for n in lengths]
    ys = [torch.randn(n, 5) + 2.0 for n in lengths]
    ws = [0.2 + torch.rand(n) for n in lengths]
    x, y, w = 1e3 * torch.randn(3, t_max, 3), 1e3 * torch.randn(3, t_max, 5), 50 * torch.rand(3, t_max)
    mask = torch.zeros(3, t_max, dtype=torch.bool)
    for b, n in enumerate(lengths):
        x[b, :n], y[b, :n], w[b, :n], mask[b, :n] = xs[b], ys[b], ws[b], True
    out = aw_cka(x, y, w, mask, estimator="debiased")
    out_gram = aw_cka_gram(x, y @ y.mT, w, mask, estimator="debiased")
    for b in range(3):
        single = aw_cka(xs[b][None], ys[b][None], ws[b][None], estimator="debiased")
        ref = ref_debiased_cka(xs[b].numpy(), ys[b].numpy(), ws[b].numpy())
        assert out[b].item() == pytest.approx(single.item(), abs=1e-5)
        assert out[b].item() == pytest.approx(ref, abs=1e-4)
        assert out_gram[b].item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("t,ds,dt", [(40, 3, 5), (30, 8, 6)])
def test_debiased_gram_form_equals_feature_form(t: int, ds: int, dt: int) -> None:
    b = 4  # aw_cka takes the cross-product route at these shapes, aw_cka_gram the Gram route
    x, y = torch.randn(b, t, ds), torch.randn(b, t, dt) + 2.0
    y[..., :3] += x[..., :3]
    w = torch.rand(b, t) ** 2
    w[2] = 0.0  # uniform fall-back
    mask = torch.rand(b, t) > 0.3
    mask[:, :4] = True
    mask[3] = True
    for m in (None, mask):
        a = aw_cka(x, y, w, m, estimator="debiased")
        g = aw_cka_gram(x, y @ y.mT, w, m, estimator="debiased")
        assert torch.allclose(a, g, atol=1e-5), (a, g)


def test_debiased_gradients() -> None:
    x = torch.randn(2, 16, 8, requires_grad=True)
    y, w = torch.randn(2, 16, 12) + x.detach() @ torch.randn(8, 12), torch.rand(2, 16)
    for fn in (lambda: aw_cka(x, y, w, estimator="debiased"),
               lambda: aw_cka_gram(x, y @ y.mT, w, estimator="debiased")):
        x.grad = None
        fn().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Finite differences (the function computes in float32 whatever the input dtype).
    x = torch.randn(1, 7, 3, dtype=torch.float64)
    y, w = torch.randn(1, 7, 4, dtype=torch.float64), 0.2 + torch.rand(1, 7, dtype=torch.float64)
    x.requires_grad_(True)
    aw_cka(x, y, w, estimator="debiased").sum().backward()
    grad, h = x.grad.clone(), 1e-3
    for idx in [(0, 0, 0), (0, 3, 1), (0, 6, 2)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[idx] += h
        xm[idx] -= h
        fd = (aw_cka(xp, y, w, estimator="debiased") - aw_cka(xm, y, w, estimator="debiased")).item() / (2 * h)
        assert grad[idx].item() == pytest.approx(fd, abs=2e-3)


@pytest.mark.parametrize("power", [0, 1, 2])
def test_debiased_float32_agrees_with_float64(power: int) -> None:
    # float32 arithmetic against the float64 references. The closed forms cancel terms when
    # the weights concentrate on few steps (effective sample size 1 / sum w^2 near 4); these
    # weights keep it around 4 to 8 at n = 8.
    x, y = torch.randn(4, 8, 6, dtype=torch.float64), torch.randn(4, 8, 9, dtype=torch.float64) + 1.0
    y[..., :6] += 0.5 * x
    w = torch.rand(4, 8, dtype=torch.float64) ** power
    for fn in (lambda: aw_cka(x, y, w, estimator="debiased"),
               lambda: aw_cka_gram(x, y @ y.mT, w, estimator="debiased")):
        out = fn()
        assert out.dtype == torch.float32
        for b in range(4):
            ref = ref_debiased_cka(x[b].numpy(), y[b].numpy(), w[b].numpy())
            assert out[b].item() == pytest.approx(ref, abs=1e-5)
    as_float32 = aw_cka(x.float(), y.float(), w.float(), estimator="debiased")
    assert torch.equal(aw_cka(x, y, w, estimator="debiased"), as_float32)
    # Longer clips, uniform weights: Song's closed form in float64.
    x, y = torch.randn(2, 200, 16), torch.randn(2, 200, 24) + 3.0
    y[..., :16] += 0.3 * x
    out = aw_cka(x, y, torch.ones(2, 200), estimator="debiased")
    for b in range(2):
        assert out[b].item() == pytest.approx(ref_song_cka(x[b].numpy(), y[b].numpy()), abs=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_debiased_removes_the_small_sample_inflation(weighted: bool) -> None:
    # Independent features with D >> T: biased linear CKA is close to 1, the debiased one is
    # centred on 0 (it can be negative). Would fail with the diagonal terms kept.
    x, y = torch.randn(128, 12, 200), torch.randn(128, 12, 300)
    w = torch.rand(128, 12) if weighted else torch.ones(128, 12)
    biased, debiased = aw_cka(x, y, w), aw_cka(x, y, w, estimator="debiased")
    assert biased.min().item() > 0.9  # about 0.94
    assert abs(debiased.mean().item()) < 0.05 and debiased.min().item() < 0  # spread about 0.15
    assert (biased - debiased).mean().item() > 0.8


def test_debiased_bounded_by_one() -> None:
    # HSIC_w is a positive combination of 4-step HSIC_1 terms, each positive semi-definite,
    # so Cauchy-Schwarz holds: |CKA| <= 1, and CKA(x, x) = 1.
    for t, d in [(5, 2), (9, 4), (30, 40)]:
        x, y = torch.randn(32, t, d), torch.randn(32, t, d)
        y[:16] = y[:16] + 2 * x[:16]
        w = 0.1 + torch.rand(32, t)
        tol = 1e-4 if t < 9 else 1e-5  # few steps: float32 cancels more
        out = aw_cka(x, y, w, estimator="debiased")
        assert bool((out.abs() <= 1 + tol).all())
        assert torch.allclose(aw_cka(x, x + 1.0, w, estimator="debiased"), torch.ones(32), atol=tol)


def test_debiased_needs_four_weighted_steps() -> None:
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6, 5)
    y[..., :3] += x
    x.requires_grad_(True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False  # 3 real steps
    mask[1, 4:] = False  # 4 real steps ...
    w = torch.rand(4, 6) + 0.1
    w[1, 0] = 0.0  # ... but only 3 of positive weight
    mask[2, 4:] = False  # 4 real steps of positive weight
    out = aw_cka(x, y, w, mask, estimator="debiased")
    assert out[0].item() == 0.0 and out[1].item() == 0.0
    # 4 steps: a single 4-set, the worst case for float32 cancellation.
    assert out[2].item() == pytest.approx(ref_debiased_cka(x[2, :4].detach().numpy(), y[2, :4].numpy(),
                                                           w[2, :4].numpy()), abs=1e-3)
    assert aw_cka_gram(x, y @ y.mT, w, mask, estimator="debiased")[:2].eq(0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[:2], torch.zeros_like(x.grad[:2]))
    assert x.grad[2].abs().sum() > 0


def test_debiased_three_weighted_steps_are_zero_even_with_concentrated_weights() -> None:
    """With 3 steps of positive weight there are no 4 distinct steps: the debiased estimator has no terms
    and the CKA is 0, per clip. Weights of 1 : d : d with d ~ 1e-5 leave float32 cancellation in the self
    terms (1 - sum w^2 alone has a relative error ~1e-8 / d) of either sign, often well above the 1e-4 resolution
    that catches smaller rounding, so only the count of weighted steps can tell (not the count of steps:
    each clip also has a real step of weight 0 and 2 padded ones; nor the batch's total)."""
    g = torch.Generator().manual_seed(11)
    b, t = 64, 6
    student, encoded = torch.randn(b, t, 3, generator=g), torch.randn(b, t, 4, generator=g)
    weight = torch.randn(5, 4, generator=g)
    teacher = encoded @ weight.T
    w = torch.zeros(b, t)
    w[:, 0] = 1.0
    w[:, 1:3] = 10 ** -(5 + torch.rand(b, 2, generator=g))  # 1e-6 to 1e-5: both self terms > 0 in ~1 clip in 10
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, 4:] = False
    student.requires_grad_(True)
    factor = teacher_factor(weight)
    outs = {"features": aw_cka(student, teacher, w, mask, estimator="debiased"),
            "gram": aw_cka_gram(student, teacher @ teacher.mT, w, mask, estimator="debiased"),
            "encoded": aw_cka_encoded(student, encoded, factor, w, mask, estimator="debiased")}
    for route, out in outs.items():
        assert torch.equal(out.detach(), torch.zeros(b)), route
        (grad,) = torch.autograd.grad(out.sum(), student)
        assert torch.equal(grad, torch.zeros_like(student)), route
    assert torch.equal(teacher_self_norm(encoded, factor, w, mask, estimator="debiased"), torch.zeros(b))


def test_unknown_estimator_is_an_error() -> None:
    x, w = torch.randn(1, 5, 3), torch.rand(1, 5)
    factor = teacher_factor(torch.randn(4, 3))
    for fn in (lambda: aw_cka(x, x, w, estimator="unbiased"),
               lambda: aw_cka_gram(x, x @ x.mT, w, estimator="unbiased"),
               lambda: aw_cka_encoded(x, x, factor, w, estimator="unbiased"),
               lambda: teacher_self_norm(x, factor, w, estimator="unbiased")):
        with pytest.raises(ValueError, match="estimator"):
            fn()


# ----------------------------------------------------------------------------- AW-CKA in encoder space

# (t, ds, denc, dt): Dt > Denc and Dt < Denc; the shapes take each route of aw_cka_encoded's step
# (aw_cka_teacher: cross-products or T x T Grams against Y = Xc' F) with either estimator.
ENCODED_SHAPES = [(40, 4, 5, 8), (30, 20, 5, 4), (12, 40, 30, 50), (20, 8, 12, 30), (9, 12, 20, 7)]


def _linear_teacher(denc: int, dt: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(dt, denc) / denc**0.5, 3.0 * torch.randn(dt)


def test_teacher_factor_reproduces_the_teacher_gram() -> None:
    for denc, dt in [(6, 10), (10, 6)]:
        weight, bias = _linear_teacher(denc, dt)
        x = torch.randn(7, denc, dtype=torch.float64)
        z = x @ weight.double().T + bias.double()
        f = teacher_factor(weight, bias).double()
        assert f.shape == (denc + 1, min(dt, denc + 1))
        y = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1) @ f
        scale = torch.cat([weight, bias[:, None]], 1).double().square().sum()
        torch.testing.assert_close(y @ y.T * scale, z @ z.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
@pytest.mark.parametrize("t,ds,denc,dt", ENCODED_SHAPES)
def test_encoded_equals_full_features(t: int, ds: int, denc: int, dt: int, estimator: str) -> None:
    b = 3
    student = torch.randn(b, t, ds, requires_grad=True)
    encoded = torch.randn(b, t, denc) + 1.0
    weight, bias = _linear_teacher(denc, dt)
    teacher = encoded @ weight.T + bias
    with torch.no_grad():
        student[..., :2] += teacher[..., :2]  # correlated
    w = 0.1 + torch.rand(b, t)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t - 2:] = False
    mask[2, : t // 3] = False
    factor = teacher_factor(weight, bias)
    out = aw_cka_encoded(student, encoded, factor, w, mask, estimator=estimator)
    (grad,) = torch.autograd.grad(out.sum(), student)
    for ref_fn in (lambda: aw_cka(student, teacher, w, mask, estimator=estimator),
                   lambda: aw_cka_gram(student, teacher @ teacher.mT, w, mask, estimator=estimator)):
        ref = ref_fn()
        (ref_grad,) = torch.autograd.grad(ref.sum(), student)
        tol = 1e-5 if estimator == "biased" else 1e-4  # the debiased closed forms cancel more
        torch.testing.assert_close(out, ref, rtol=0, atol=tol)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=tol / 10)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_precomputed_teacher_norm(estimator: str) -> None:
    lengths, t_max, ds, denc, dt = [10, 16, 7], 16, 6, 9, 14
    weight, bias = _linear_teacher(denc, dt)
    factor = teacher_factor(weight, bias)
    student, encoded = torch.randn(3, t_max, ds), torch.randn(3, t_max, denc)
    w = torch.rand(3, t_max)
    mask = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]
    norm = teacher_self_norm(encoded, factor, w, mask, estimator=estimator)
    assert norm.shape == (3,) and norm.dtype == torch.float32 and bool((norm > 0).all())
    with_norm = aw_cka_encoded(student, encoded, factor, w, mask, estimator=estimator, teacher_norm=norm)
    assert torch.equal(with_norm, aw_cka_encoded(student, encoded, factor, w, mask, estimator=estimator))
    # Computed per clip without padding (as at cache time), it serves the padded batch.
    singles = torch.cat([teacher_self_norm(encoded[b : b + 1, :n], factor, w[b : b + 1, :n], estimator=estimator)
                         for b, n in enumerate(lengths)])
    torch.testing.assert_close(singles, norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(aw_cka_encoded(student, encoded, factor, w, mask, estimator=estimator,
                                              teacher_norm=singles), with_norm, rtol=0, atol=1e-6)
    # The given normaliser is the one used: doubled, it halves every clip's CKA.
    torch.testing.assert_close(aw_cka_encoded(student, encoded, factor, w, mask, estimator=estimator,
                                              teacher_norm=2 * norm), with_norm / 2, rtol=1e-6, atol=0)
    if estimator == "biased":  # the documented default
        assert torch.equal(teacher_side(encoded, factor, w, mask).norm, norm)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_encoded_bias_cancels_and_rank_deficient_weights(estimator: str) -> None:
    # b cancels for both estimators (it only enters the degenerate test): the same value with
    # and without it; a rank-2 W (Dt > Denc > 2) is handled exactly.
    t, ds, denc, dt = 12, 5, 6, 10
    student, encoded = torch.randn(2, t, ds), torch.randn(2, t, denc) + 2.0
    weight = torch.randn(dt, 2) @ torch.randn(2, denc)
    bias = 10.0 * torch.randn(dt)
    w = torch.rand(2, t)
    out = aw_cka_encoded(student, encoded, teacher_factor(weight, bias), w, estimator=estimator)
    torch.testing.assert_close(out, aw_cka_encoded(student, encoded, teacher_factor(weight), w, estimator=estimator),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out, aw_cka(student, encoded @ weight.T + bias, w, estimator=estimator),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_encoded_teacher_constant_in_feature_space_is_degenerate(estimator: str) -> None:
    # X varies only in the null space of W: Z_T = X W^T + b is constant although X is not.
    t, denc = 10, 6
    weight = torch.cat([torch.randn(8, 3), torch.zeros(8, 3)], dim=1)
    bias = torch.randn(8)
    encoded = torch.randn(2, t, denc)
    encoded[..., :3] = torch.randn(2, 1, 3)
    student = torch.randn(2, t, 4, requires_grad=True)
    w = torch.rand(2, t)
    full = aw_cka(student, encoded @ weight.T + bias, w, estimator=estimator)
    out = aw_cka_encoded(student, encoded, teacher_factor(weight, bias), w, estimator=estimator)
    assert torch.equal(full.detach(), torch.zeros(2)) and torch.equal(out.detach(), torch.zeros(2))
    assert torch.equal(teacher_self_norm(encoded, teacher_factor(weight, bias), w, estimator=estimator),
                       torch.zeros(2))
    out.sum().backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_encoded_bf16_autocast_computes_in_float32() -> None:
    t, ds, denc, dt = 30, 16, 12, 24
    weight, bias = _linear_teacher(denc, dt)
    factor = teacher_factor(weight, bias)
    student, encoded, w = torch.randn(2, t, ds), torch.randn(2, t, denc), torch.rand(2, t)
    student[..., :12] += encoded
    sb, eb = student.bfloat16().requires_grad_(True), encoded.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm = teacher_self_norm(eb, factor, w.bfloat16())
        out = aw_cka_encoded(sb, eb, factor, w.bfloat16(), teacher_norm=norm)
    assert norm.dtype == torch.float32 and out.dtype == torch.float32
    ref = aw_cka_encoded(sb.detach().float(), eb.float(), factor, w.bfloat16().float())
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(sb.grad.float()).all()


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


@pytest.mark.parametrize("k", [9, 14])
def test_teacher_ids_beyond_student_vocab_are_dropped(k: int) -> None:
    """Also with k = V: 5 of the top 14 ids lie beyond the vocabulary, so each position covers only 9 of
    the student's 14 ids and keeps its tail bucket (full cover is per position, not per batch)."""
    v, extra, temperature = 14, 5, 1.5
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


def test_a_one_token_student_vocabulary_gives_zero() -> None:
    """With a single student token q is certain, and so is the teacher restricted to it: the KL is 0
    whether the teacher's top-k holds id 0 or only ids beyond the vocabulary, and on padding. (Dropped
    ids must not index past V = 1.)"""
    teacher = 2 * torch.randn(2, 3, 5)
    teacher[:, 0, 0] = 10.0  # id 0 is the teacher's top-1
    teacher[:, 1, 0] = -10.0  # id 0 is outside the top-3: every kept id is dropped, its mass is in the tail
    ids, logprobs = topk_logprobs(teacher, 3)
    assert bool((ids[:, 0, 0] == 0).all()) and bool((ids[:, 1] > 0).all())
    student = torch.randn(2, 3, 1, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = bucketed_kl(student, ids, logprobs, mask, 2.0)
    assert torch.allclose(out, torch.zeros(2), atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("k", [3, 16])
def test_gradient_finite_and_flows(k: int) -> None:
    v = 16
    s = _logits(2, 5, v).requires_grad_(True)
    t = _logits(2, 5, v)
    out = bucketed_kl(s, *topk_logprobs(t, k, 2.0), torch.ones(2, 5, dtype=torch.bool), 2.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def _autograd_bucketed_kl(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor, vocab_drop: bool,
                          temperature: float) -> torch.Tensor:
    """The bucketed KL by plain float64 autograd from dense q (q_tail = 1 - sum q_i), teacher ids >= V dropped
    and the rest renormalised: an independent reference for the hand-written backward."""
    q = torch.softmax(s.double() / temperature, -1)
    keep = (ids < s.shape[-1]) & mask[..., None]
    p = lp.double().exp()
    z = 1 - torch.where(keep, 0.0, p).sum(-1) if vocab_drop else torch.ones_like(p[..., 0])
    pk, qk = torch.where(keep, p, 0.0) / z[..., None], q.gather(-1, torch.where(keep, ids, 0))
    r = 1 - pk.sum(-1)
    q_tail = 1 - torch.where(keep, qk, 0.0).sum(-1)
    kl = torch.where(keep, pk * (pk.clamp_min(1e-300).log() - qk.log()), 0.0).sum(-1) + r * (r.log() - q_tail.log())
    return torch.where(mask, kl, 0.0).sum(-1) / mask.sum(-1) * temperature**2


@pytest.mark.parametrize("extra", [0, 5])
def test_the_gradient_is_that_of_plain_autograd(extra: int) -> None:
    """bucketed_kl's hand-written backward (one exp per log-sum-exp) equals float64 autograd of the textbook
    formula, with teacher ids beyond the student's vocabulary (extra; at one position all of its top-k, so
    no teacher mass is left there) and a masked position."""
    v, k, temperature = 12, 4, 2.0
    s = _logits(2, 5, v).requires_grad_(True)
    t = _logits(2, 5, v + extra)
    t[..., v:] += 4.0  # out-of-vocabulary ids in the top-k
    t[0, 2, v:] += 20.0
    ids, lp = topk_logprobs(t, k, temperature)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False
    weights = torch.tensor([0.7, -1.3])  # a weighted sum, so each clip's gradient is scaled differently
    (grad,) = torch.autograd.grad((bucketed_kl(s, ids, lp, mask, temperature) * weights).sum(), s)
    s64 = s.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad((_autograd_bucketed_kl(s64, ids, lp, mask, extra > 0, temperature)
                                       * weights.double()).sum(), s64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(grad[1, 3], torch.zeros(v))
    # a retained graph runs the backward again with the same result (as the report's gradient probes do)
    out = (bucketed_kl(s, ids, lp, mask, temperature) * weights).sum()
    first = torch.autograd.grad(out, s, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(out, s)[0], first)


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


# ----------------------------------------------------------------------------- the KL through the output layer


def _linear_case(b: int, l: int, d: int, v: int, extra: int = 0, scale: float = 1.0):
    """Hidden states, an output layer and the teacher's targets over the student's v ids (`extra` teacher ids
    beyond them), with one clip that has no KL position and one masked position."""
    from pldistill_cli.losses import kl_targets

    hidden, weight = torch.randn(b, l, d), scale * torch.randn(v, d) / d**0.5
    t = torch.randn(b, l, v + extra) * 2
    t[..., v:] += 3.0
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[0] = False
    mask[1, 2] = False
    ids, lp = topk_logprobs(t, 4, 2.0)
    return hidden, weight, kl_targets(ids, lp, mask, v), mask


@pytest.mark.parametrize("chunk_bytes, extra, scale", [(2**26, 0, 1.0), (4 * 40 * 3, 0, 1.0), (4 * 40 * 2, 6, 1.0),
                                                       (4 * 40 * 5, 0, 4000.0)])
def test_the_kl_through_the_output_layer_is_the_kl_of_its_logits(chunk_bytes: int, extra: int, scale: float) -> None:
    """linear_kl (rows through the output layer a chunk at a time, gradients taken in the forward pass) equals
    kl_from_targets on the dense logits, in value and in its gradients on the hidden states and the weight:
    whole, in chunks of 3 or 2 rows (14 rows), with teacher ids beyond the vocabulary, and with a student so
    confident (scale 4000) that its tail underflows against the row's max and is recomputed exactly."""
    from pldistill_cli.losses import kl_from_targets, linear_kl

    hidden, weight, targets, mask = _linear_case(3, 6, 8, 40, extra, scale)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = kl_from_targets(h1 @ w1.T, targets, mask, 2.0).mean()
    expected.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = linear_kl(h2, w2, targets, mask, 2.0, chunk_bytes)
    (0.5 * out).backward()  # the upstream gradient scales both
    assert torch.isfinite(expected) and float(expected) > 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, 0.5 * h1.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w2.grad, 0.5 * w1.grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(h2.grad[0], torch.zeros_like(h2.grad[0])) and torch.equal(h2.grad[1, 2], torch.zeros(8))
    if scale > 1:  # the case exercised the exact recomputation: some tail sums underflow
        logits = (hidden @ weight.T)[mask]
        assert ((logits - logits.amax(-1, keepdim=True)) / 2.0 < -104).any()


def test_the_kl_through_the_output_layer_under_bf16_autocast_and_without_gradients() -> None:
    """Under bf16 autocast (CUDA's choice) the products run in bf16 and the result is the KL of the bf16
    logits; the weight's gradient stays float32. Without gradients, only the value is computed."""
    from pldistill_cli.losses import kl_from_targets, linear_kl

    hidden, weight, targets, mask = _linear_case(2, 5, 8, 40)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_kl(hidden, w, targets, mask, 2.0)
    rounded = (hidden.bfloat16() @ weight.bfloat16().T).float()
    torch.testing.assert_close(out, kl_from_targets(rounded, targets, mask, 2.0).mean(), rtol=1e-5, atol=1e-6)
    out.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(linear_kl(hidden, weight, targets, mask, 2.0),
                                   kl_from_targets(hidden @ weight.T, targets, mask, 2.0).mean())
