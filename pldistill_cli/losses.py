"""Distillation losses: attention-weighted CKA for hidden states, bucketed KL for logits.

All functions are pure and differentiable w.r.t. the student; the maths is done in
float32 with autocast disabled, whatever the input dtype or the caller's autocast.

References: aw_cka, aw_cka_encoded, teacher_self_norm, full_kl and bucketed_kl are the direct forms, which
no stage calls: tests and benchmarks check the forms the stages use (aw_cka_teacher, aw_cka_gram,
kl_targets + linear_kl) against them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_TINY = torch.finfo(torch.float32).tiny
_MIN = torch.finfo(torch.float32).min


def _no_autocast(t: Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


# --------------------------------------------------------------------------- AW-CKA

ESTIMATORS = ("biased", "debiased")
_RESOLUTION = 1e-4  # a debiased self-HSIC below this fraction of its terms is float32 noise
_GRAM_RESOLUTION = 1e-5  # variance / second moment read off a centred float32 raw Gram: ~1e-6 noise


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")


def _step_weights(weights: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Normalise weights [B, T] over real steps; returns (w, mask) with w summing to 1.

    Weights are treated as constants (detached); negatives are clamped to 0. Masked
    steps get weight 0. A clip whose real steps all have weight 0 falls back to uniform
    weights over its real steps; a clip with no real steps keeps w = 0 (similarity 0).
    """
    w = weights.detach().float().clamp_min(0.0)
    m = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool()
    w = torch.where(m, w, 0.0)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, m.float())
    return w / w.sum(-1, keepdim=True).clamp_min(_TINY), m


def _too_few_steps(w: Tensor, estimator: str) -> Tensor:
    """Per clip: fewer steps of positive weight than the estimator needs (debiased: 4, biased: 1)."""
    return (w > 0).sum(-1) < (4 if estimator == "debiased" else 1)


def _scaled(z: Tensor, m: Tensor) -> Tensor:
    """Z in float32, zeroed on masked steps and divided by its (detached) max |value| per clip.

    Leaves CKA unchanged (scale invariance) but keeps float32 far from overflow.
    """
    z = torch.where(m[..., None], z.float(), 0.0)
    return z / z.abs().amax(dim=(1, 2), keepdim=True).clamp_min(_TINY).detach()


def _centre(z: Tensor, w: Tensor, m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Zc = Z - 1 mu^T on real steps (0 on masked ones), mu = w^T Z; plus a 'degenerate' flag.

    A side is degenerate (constant features) when its weighted variance sum_t w_t ||zc_t||^2
    is at most eps times its uncentred weighted second moment sum_t w_t ||z_t||^2.
    """
    mu = torch.einsum("bt,btd->bd", w, z)
    zc = torch.where(m[..., None], z - mu[:, None, :], 0.0)
    with torch.no_grad():  # a flag: no gradient, so no graph
        var = (w[..., None] * zc.square()).sum(dim=(1, 2))
        raw = (w[..., None] * z.square()).sum(dim=(1, 2))
        return zc, var <= eps * raw


def _centre_features(z: Tensor, w: Tensor, m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """_centre of _scaled features: centred float32 features [B, T, D] and the degenerate flag."""
    return _centre(_scaled(z, m), w, m, eps)


def _centre_gram(k: Tensor, w: Tensor, m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Kc = C K C^T with C = I - 1 w^T (the Gram of centred features); same flag as features,
    with eps raised to _GRAM_RESOLUTION (centring a raw Gram in float32 leaves the variance of
    constant features at up to ~1e-6 of their second moment, not ~1e-14 as from features).

    C K C^T = K - (K w) 1^T - 1 (w^T K) + (w^T K w) 1 1^T; 0 on masked rows and columns,
    K divided by its (detached) max |value| first.
    """
    mm = m[:, :, None] & m[:, None, :]
    k = torch.where(mm, k.float(), 0.0)
    k = k / k.abs().amax(dim=(1, 2), keepdim=True).clamp_min(_TINY).detach()
    kw = k @ w[..., None]  # [B, T, 1]
    wk = w[:, None, :] @ k  # [B, 1, T]
    wkw = wk @ w[..., None]  # [B, 1, 1]
    kc = torch.where(mm, k - kw - wk + wkw, 0.0)
    sw = w.sqrt()
    var = (sw * kc.diagonal(dim1=1, dim2=2) * sw).sum(-1)
    raw = (w * k.diagonal(dim1=1, dim2=2)).sum(-1)
    return kc, var <= max(eps, _GRAM_RESOLUTION) * raw


def _weighted(zc: Tensor, w: Tensor) -> Tensor:
    """diag(sqrt(w)) Zc: the biased estimator's features, whose Gram is G = D Kc D."""
    return w.sqrt()[..., None] * zc


def _quad(a: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """a^T K b per clip: a, b [B, T], K [B, T, T] -> [B]."""
    return (a[:, None, :] @ (k @ b[..., None]))[:, 0, 0]


def _debiased_gram(k: Tensor, l: Tensor, w: Tensor) -> Tensor:
    """The terms [B, 7] of c4 HSIC_w(K, L), from centred Grams K, L [B, T, T] (K w = L w = 0).

    HSIC_w is the w-weighted U-statistic of Song et al.'s order-4 kernel (see aw_cka) and
    c4 = sum of w_i w_j w_q w_r over distinct (i, j, q, r). Inclusion-exclusion over the
    coinciding indices, with K w = L w = 0, H = K o L, w2 = w o w, s2 = sum w2, d = diagonals:

        c4 HSIC_w = (1 - s2) (w^T H w - sum w2 dK dL) - 2 w^T H w2 + 2 w2^T H w2
                    + (w2^T dK)(w2^T dL) - 2 w2^T K (w2 o dL) - 2 w2^T L (w2 o dK).

    O(T^2). The terms cancel more as the weights concentrate on fewer than ~4 steps.
    """
    w2 = w.square()
    dk, dl = k.diagonal(dim1=1, dim2=2), l.diagonal(dim1=1, dim2=2)
    hw = (k * l) @ torch.stack([w, w2], dim=-1)  # [B, T, 2]
    c = 1 - w2.sum(-1)
    return torch.stack([
        c * (w * hw[..., 0]).sum(-1),
        -c * (w2 * dk * dl).sum(-1),
        -2 * (w * hw[..., 1]).sum(-1),
        2 * (w2 * hw[..., 1]).sum(-1),
        (w2 * dk).sum(-1) * (w2 * dl).sum(-1),
        -2 * _quad(w2, k, w2 * dl),
        -2 * _quad(w2, l, w2 * dk),
    ], dim=-1)


def _debiased_features(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """_debiased_gram's terms for K = X X^T, L = Y Y^T from centred features X [B, T, Dx],
    Y [B, T, Dy], in O(T Dx Dy): with W = diag(w), nx_i = ||x_i||^2, ny_i = ||y_i||^2,

        w^T H w = ||X^T W Y||_F^2,   w^T H w2 = <X^T W Y, X^T W^2 Y>_F,
        w2^T H w2 = ||X^T W^2 Y||_F^2,   w2^T K (w2 o dL) = (X^T w2) . (X^T (w2 o ny)).
    """
    w2 = w.square()
    nx, ny = x.square().sum(-1), y.square().sum(-1)
    c1 = x.mT @ (w[..., None] * y)
    c2 = x.mT @ (w2[..., None] * y)
    xw2, yw2 = torch.einsum("bt,btd->bd", w2, x), torch.einsum("bt,btd->bd", w2, y)
    c = 1 - w2.sum(-1)
    return torch.stack([
        c * c1.square().sum(dim=(1, 2)),
        -c * (w2 * nx * ny).sum(-1),
        -2 * (c1 * c2).sum(dim=(1, 2)),
        2 * c2.square().sum(dim=(1, 2)),
        (w2 * nx).sum(-1) * (w2 * ny).sum(-1),
        -2 * (xw2 * torch.einsum("bt,btd->bd", w2 * ny, x)).sum(-1),
        -2 * (yw2 * torch.einsum("bt,btd->bd", w2 * nx, y)).sum(-1),
    ], dim=-1)


def _hsic(a: Tensor, b: Tensor, w: Tensor, estimator: str, gram: bool) -> Tensor:
    """The CKA inner product [B] of two sides given as T x T Grams (gram) or as features.

    biased: <G_a, G_b>_F = ||a^T b||_F^2 of sides already scaled by _weighted;
    debiased: c4 HSIC_w of centred, unscaled sides (the sum of _debiased_gram's terms).
    A debiased self term (b is a) at most _RESOLUTION times the sum of its terms' magnitudes
    is float32 cancellation noise (weights on fewer than ~4 steps) and is returned as 0.
    """
    if estimator == "biased":
        return (a * b).sum(dim=(1, 2)) if gram else (a.mT @ b).square().sum(dim=(1, 2))
    terms = _debiased_gram(a, b, w) if gram else _debiased_features(a, b, w)
    n = terms.sum(-1)
    return torch.where(n > _RESOLUTION * terms.abs().sum(-1), n, 0.0) if b is a else n


def _cost_factor(estimator: str) -> int:
    """Cross-products per pair in the feature form (the debiased one needs W and W^2)."""
    return 2 if estimator == "debiased" else 1


def _cka_terms(zs: Tensor, zt: Tensor, w: Tensor, estimator: str) -> tuple[Tensor, Tensor, Tensor]:
    """(cross, student self, teacher self) from centred features, through T x T Grams or
    D x D cross-products, whichever is cheaper."""
    if estimator == "biased":
        zs, zt = _weighted(zs, w), _weighted(zt, w)
    t, ds, dt = zs.shape[1], zs.shape[2], zt.shape[2]
    gram = t * (ds + dt) <= _cost_factor(estimator) * (ds * ds + ds * dt + dt * dt)
    a, b = (zs @ zs.mT, zt @ zt.mT) if gram else (zs, zt)
    return _hsic(a, b, w, estimator, gram), _hsic(a, a, w, estimator, gram), _hsic(b, b, w, estimator, gram)


def _self_term(z: Tensor, w: Tensor, estimator: str) -> Tensor:
    """_hsic(z, z) of one side (scaled as _hsic expects), by Gram or features, whichever is cheaper."""
    gram = z.shape[1] <= _cost_factor(estimator) * z.shape[2]
    a = z @ z.mT if gram else z
    return _hsic(a, a, w, estimator, gram)


def _safe_cka(num: Tensor, ns2: Tensor, nt2: Tensor, degenerate: Tensor) -> Tensor:
    """num / (sqrt(ns2) sqrt(nt2)), or 0 (with zero, finite gradients) where degenerate."""
    ok = ~degenerate & (ns2 > 0) & (nt2 > 0)
    den = torch.where(ok, ns2, 1.0).sqrt() * torch.where(ok, nt2, 1.0).sqrt()
    return torch.where(ok, num / den, 0.0)


def aw_cka(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    estimator: str = "biased",
) -> Tensor:
    """Reference (no stage calls it). Attention-weighted linear CKA per clip.

    student [B, T, Ds], teacher [B, T, Dt], weights [B, T] >= 0, mask [B, T] bool
    (True = real step). With w the weights normalised over real steps,

        mu = w^T Z,   Zc = diag(sqrt(w)) (Z - 1 mu^T),   G = Zc Zc^T,
        AW-CKA = <G_S, G_T>_F / (||G_S||_F ||G_T||_F)
               = ||Zc_S^T Zc_T||_F^2 / (||Zc_S^T Zc_S||_F ||Zc_T^T Zc_T||_F).

    Uniform w gives standard linear CKA. Invariant to orthogonal maps, isotropic scaling
    and feature-wise offsets of either side. Masked steps (weights and features) have no
    influence; padding must be finite. A clip whose weights are all 0 on its real steps
    uses uniform weights. If either side is (numerically) constant -- weighted variance
    <= eps * weighted second moment -- the similarity is 0 with zero gradients.
    Uses T x T Grams or D x D cross-products, whichever is cheaper. Returns float32 [B].

    estimator="debiased": <G_S, G_T> is (up to a factor that cancels) a V-statistic,
    sum over ALL (i, j, q, r) of w_i w_j w_q w_r h_ijqr with Song et al.'s (2012) kernel
    h_ijqr = k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (K = Z_S Z_S^T, L = Z_T Z_T^T raw). The
    debiased estimator keeps only distinct indices (removes the inflating diagonal terms):

        HSIC_w(K, L) = sum_distinct w_i w_j w_q w_r h_ijqr / sum_distinct w_i w_j w_q w_r,
        CKA = HSIC_w(K, L) / sqrt(HSIC_w(K, K) HSIC_w(L, L)).

    Uniform w gives Song's unbiased HSIC_1, i.e. the debiased CKA of Nguyen et al. (2021);
    for any fixed w it is unbiased for i.i.d. steps. Each 4-set's term is Song's HSIC_1 of
    those 4 steps, which is invariant to feature offsets and positive semi-definite, so
    HSIC_w is too: the debiased AW-CKA has the same invariances (offsets, orthogonal maps,
    isotropic scaling) and lies in [-1, 1] (it can be negative; -1 <= CKA, not 0 <= CKA).
    It needs at least 4 steps of positive weight (so at least 4 real steps): otherwise 0,
    as is a non-positive self-HSIC. Computed in O(T^2) or O(T D^2) (_debiased_gram,
    _debiased_features), about twice the cost of the biased one in the feature form. Its
    closed forms cancel terms, more so with few steps or weights concentrated on 2 or 3
    steps: float32 error is about 1e-6 for 1 / sum w^2 >= 10, 1e-5 to 1e-4 below that;
    a self-HSIC lost in rounding (< _RESOLUTION of its terms) counts as non-positive.
    """
    _check_estimator(estimator)
    with _no_autocast(student):
        w, m = _step_weights(weights, mask)
        zs, deg_s = _centre_features(student, w, m, eps)
        zt, deg_t = _centre_features(teacher, w, m, eps)
        terms = _cka_terms(zs, zt, w, estimator)
        return _safe_cka(*terms, deg_s | deg_t | _too_few_steps(w, estimator))


def aw_cka_gram(
    student: Tensor,
    teacher_gram: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    estimator: str = "biased",
) -> Tensor:
    """AW-CKA with the teacher given as its raw Gram K = Z_T Z_T^T [B, T, T].

    Raw means uncentred and unweighted (e.g. cached once per clip). Centring on the Gram:
    C = I - 1 w^T, D = diag(sqrt(w)), G_T = D C K C^T D (debiased: C K C^T). Equals
    aw_cka(student, teacher, weights, mask, eps, estimator) up to float error, except that
    the teacher counts as constant below max(eps, 1e-5) (the float32 resolution of a raw Gram).
    """
    _check_estimator(estimator)
    with _no_autocast(student):
        w, m = _step_weights(weights, mask)
        zs, deg_s = _centre_features(student, w, m, eps)
        kt, deg_t = _centre_gram(teacher_gram, w, m, eps)
        if estimator == "biased":
            zs, sw = _weighted(zs, w), w.sqrt()
            kt = sw[:, :, None] * kt * sw[:, None, :]
        ks = zs @ zs.mT
        terms = [_hsic(a, b, w, estimator, True) for a, b in ((ks, kt), (ks, ks), (kt, kt))]
        return _safe_cka(*terms, deg_s | deg_t | _too_few_steps(w, estimator))


# ------------------------------------------------ AW-CKA of a linear teacher, in encoder space


def teacher_factor(weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F [Denc + 1, r] with F F^T = A^T A / ||A||_F^2 for A = [W | b] [Dt, Denc + 1].

    The teacher's projector is Z_T = X W^T + 1 b^T = X' A^T with X' = [X | 1], so every
    Gram of teacher features is one of X' F: Z_T Z_T^T = (X' F)(X' F)^T ||A||_F^2, and
    Y = X' F [T, r], r = min(Dt, Denc + 1), stands for Z_T exactly in AW-CKA (scale cancels).
    F = R^T from the reduced QR A = QR, in float64: exact for any rank (no Cholesky of the
    possibly singular A^T A, no squared condition number). Computed once per cache (detached).
    b = None means no bias. The bias row matters only for the degenerate test (the uncentred
    second moment); centring removes it from everything else.
    """
    a = weight.detach().double()
    b = a.new_zeros(a.shape[0]) if bias is None else bias.detach().double()
    a = torch.cat([a, b[:, None]], dim=1)
    a = a / torch.linalg.matrix_norm(a).clamp_min(_TINY)
    return torch.linalg.qr(a, mode="r").R.mT.float().contiguous()


def _encoder_inputs(encoded: Tensor, m: Tensor) -> Tensor:
    """X' = [X | 1] [B, T, Denc + 1] through _scaled (the factor F has unit Frobenius norm,
    so ||x'_t F|| <= ||x'_t||: the teacher side Y = X' F stays as well scaled as X')."""
    x = encoded.float()
    return _scaled(torch.cat([x, torch.ones_like(x[..., :1])], dim=-1), m)


class TeacherSide(NamedTuple):
    """The teacher's side of aw_cka_encoded, a constant of the clips (teacher_side)."""

    y: Tensor  # [B, T, r] centred Y = [X | 1] F of the _scaled encoder output (biased: sqrt(w)-weighted)
    w: Tensor  # [B, T] step weights normalised over the real steps
    mask: Tensor  # [B, T] real steps
    norm: Tensor  # [B] sqrt of the teacher's self term, 0 where degenerate or with too few steps
    estimator: str


def teacher_side(
    encoded: Tensor,
    factor: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    estimator: str = "biased",
    norm: Tensor | None = None,
) -> TeacherSide:
    """Everything of aw_cka_encoded that depends only on the teacher (encoder output X [B, T, Denc],
    factor = teacher_factor(W, b), weights, mask): computed once per clip, so a training step
    computes only the student's side (aw_cka_teacher). `norm` (an earlier teacher_side(...).norm
    of the same clips) skips the teacher's self term: biased ||G_T||_F, debiased sqrt(c4 HSIC_w(L, L)).
    """
    _check_estimator(estimator)
    with torch.no_grad(), _no_autocast(encoded):
        w, m = _step_weights(weights, mask)
        y, degenerate = _centre(_encoder_inputs(encoded, m) @ factor.float(), w, m, eps)
        y = _weighted(y, w) if estimator == "biased" else y
        if norm is None:
            n2 = _self_term(y, w, estimator)
            ok = ~degenerate & (n2 > 0)
            norm = torch.where(ok, torch.where(ok, n2, 1.0).sqrt(), 0.0)
        # too few steps for the estimator: similarity 0, folded into the normaliser so a step need not test it
        return TeacherSide(y, w, m, torch.where(_too_few_steps(w, estimator), 0.0, norm.float()), estimator)


def teacher_self_norm(
    encoded: Tensor,
    factor: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    estimator: str = "biased",
) -> Tensor:
    """Reference (no stage calls it). The teacher's CKA normaliser [B] for aw_cka_encoded, a constant of the cached clip.

    sqrt of the teacher self term of Y = [X | 1] F on the _scaled encoder output (biased:
    ||G_T||_F; debiased: sqrt(c4 HSIC_w(L, L))), 0 where the teacher is degenerate.
    Its scale is internal: use it only with aw_cka_encoded and the same encoded, factor,
    weights, mask, eps and estimator (padding does not change it). Float32 [B].
    """
    return teacher_side(encoded, factor, weights, mask, eps, estimator).norm


def aw_cka_teacher(student: Tensor, teacher: TeacherSide, eps: float = 1e-8) -> Tensor:
    """aw_cka_encoded from its teacher side: the student's centring, the cross term against Y
    and the student's self term, through T x T Grams or cross-products, whichever is cheaper."""
    with _no_autocast(student):
        estimator, w, y = teacher.estimator, teacher.w, teacher.y
        zs, degenerate = _centre_features(student, w, teacher.mask, eps)
        zs = _weighted(zs, w) if estimator == "biased" else zs
        t, ds, r = zs.shape[1], zs.shape[2], y.shape[2]
        # multiply-adds, forward and backward: Grams 2 T^2 Ds + T^2 r (Y Y^T needs no backward);
        # cross-products 2 T Ds r + 2 T Ds min(T, Ds) (the self term by whichever form is cheaper)
        if t * (2 * ds + r) <= _cost_factor(estimator) * 2 * ds * (r + min(t, ds)):
            ks = zs @ zs.mT
            cross, self_s = _hsic(ks, y @ y.mT, w, estimator, True), _hsic(ks, ks, w, estimator, True)
        else:
            cross, self_s = _hsic(zs, y, w, estimator, False), _self_term(zs, w, estimator)
        return _safe_cka(cross, self_s, teacher.norm.square(), degenerate)  # sqrt(norm^2) == norm exactly


def aw_cka_encoded(
    student: Tensor,
    encoded: Tensor,
    factor: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    estimator: str = "biased",
    teacher_norm: Tensor | None = None,
) -> Tensor:
    """Reference (no stage calls it). AW-CKA against a linear teacher Z_T = X W^T + b given by its encoder output X.

    encoded X [B, T, Denc] (e.g. cached); factor = teacher_factor(W, b); teacher_norm [B]
    = teacher_self_norm(encoded, factor, weights, mask, eps, estimator), computed here if
    None. With weighted centring the bias cancels (Zc_T = Xc W^T), and F F^T ~ W^T W, so
    Y = Xc' F [T, r] stands for Z_T: O(T Denc r) on the teacher's side (teacher_side, a
    constant of the clip), O(T Ds r) or O(T^2 (Ds + r)) per step (aw_cka_teacher), never
    forming the Dt-wide Z_T. The debiased estimator is offset-invariant too, so it works on
    Y the same way. Equals aw_cka(student, X W^T + b, weights, mask, eps, estimator) up to
    float error.
    """
    return aw_cka_teacher(student, teacher_side(encoded, factor, weights, mask, eps, estimator, teacher_norm), eps)


# --------------------------------------------------------------------------- logits KL


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-clip mean of values [B, L] over mask [B, L]; 0 for clips with no positions."""
    m = mask.bool()
    total = torch.where(m, values, 0.0).sum(-1)
    return total / m.sum(-1).clamp_min(1)


def topk_logprobs(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(ids, logprobs) [..., k] of the top-k of log_softmax(logits / T) (float32).

    The teacher-cache side: bucketed_kl(s, *topk_logprobs(t, k, T), mask, T) is the
    bucketed estimator computed from dense teacher logits t.
    """
    with _no_autocast(logits):
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        values, ids = logp.topk(k, dim=-1)
        return ids, values


def full_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Reference (no stage calls it). Dense T^2 * KL(p || q), p = softmax(teacher / T), q = softmax(student / T).

    Per-clip mean over masked positions, float32 [B] (0 for clips with no positions).
    """
    with _no_autocast(student_logits):
        logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
        logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p = logp.exp()
        kl = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        return _masked_mean(kl, mask) * temperature**2


class KLTargets(NamedTuple):
    """The teacher's side of bucketed_kl, a constant of the clips (kl_targets): per position,
    the buckets' renormalised probabilities and what the student's side needs to read them."""

    ids: Tensor  # [B, L, k] student ids of the top-k buckets (0 where dropped)
    p: Tensor  # [B, L, k] p_i / z (0 where dropped)
    tail: Tensor  # [B, L] r / z
    cover: Tensor  # [B, L, k] ids taken out of the tail bucket (a dropped slot repeats a kept id)
    mass: Tensor  # [B, L] sum_i p_i / z + r / z: 1 where the position has teacher mass, else 0
    neg_entropy: Tensor  # [B, L] sum_i p'_i log p'_i + r' log r'


def kl_targets(teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor, mask: Tensor, vocab: int) -> KLTargets:
    """The teacher's side of bucketed_kl over a vocabulary of `vocab` student ids (see there):
    computed once per clip, so a training step reads the student's logits only at the buckets."""
    with torch.no_grad(), _no_autocast(teacher_topk_logprobs):
        m = mask.bool()[..., None]
        keep = m & (teacher_topk_ids >= 0) & (teacher_topk_ids < vocab)
        ids = torch.where(keep, teacher_topk_ids, 0)
        logp = teacher_topk_logprobs.float()
        p = torch.where(m, logp.exp(), 0.0)  # no mass on padding
        kept_mass = torch.where(keep, p, 0.0).sum(-1)
        dropped_mass = torch.where(keep, 0.0, p).sum(-1)
        if ids.shape[-1] >= vocab:  # only then can the kept ids cover the whole vocabulary
            covered = p.new_zeros((*ids.shape[:-1], vocab)).scatter_add_(-1, ids, keep.float())
            full_cover = (covered > 0).sum(-1) >= vocab
        else:
            full_cover = torch.zeros_like(kept_mass, dtype=torch.bool)
        # No kept id: all the teacher's remaining mass and all the student's mass lie in the tail: KL 0.
        r = torch.where(full_cover | ~keep.any(-1), 0.0, (1.0 - kept_mass - dropped_mass).clamp_min(0.0))
        z = kept_mass + r  # = 1 - dropped mass: normaliser of the kept buckets
        valid = z > 0
        log_z = torch.where(valid, z, 1.0).log()
        p = torch.where(keep & valid[..., None], p / torch.where(valid, z, 1.0)[..., None], 0.0)
        tail = torch.where(valid, r / torch.where(valid, z, 1.0), 0.0)
        neg_entropy = (torch.where(p > 0, p * (logp - log_z[..., None]), 0.0).sum(-1)
                       + torch.where(tail > 0, tail * torch.where(tail > 0, tail, 1.0).log(), 0.0))
        first_kept = ids.gather(-1, keep.int().argmax(-1, keepdim=True))
        cover = torch.where(keep, ids, first_kept)
        return KLTargets(ids, p, tail, cover, p.sum(-1) + tail, neg_entropy)


class _BucketedKL(torch.autograd.Function):
    """Per-position KL_b of kl_from_targets from the student's logits s and u = s / T, with its gradient
    dKL_b/ds = ((sum_i p'_i + r') q - r' q_tail - p' (at the bucket ids)) / T, q = softmax(u), q_tail =
    softmax of u over the tail ids: one exp per log-sum-exp and none in the backward pass (autograd
    through two logsumexps and a gather makes about twice the passes over [B, L, V])."""

    @staticmethod
    def forward(ctx, logits: Tensor, t: KLTargets, temperature: float) -> Tensor:
        u = logits.float() / temperature
        a = u.amax(-1, keepdim=True)
        q = (u - a).exp_()
        s = q.sum(-1, keepdim=True)
        tail_u = u.scatter(-1, t.cover, _MIN)
        a_tail = tail_u.amax(-1, keepdim=True)
        q_tail = tail_u.sub_(a_tail).exp_()
        s_tail = q_tail.sum(-1, keepdim=True)
        ctx.temperature = temperature
        ctx.save_for_backward(q.div_(s), q_tail.div_(s_tail), t.ids, t.p, t.tail, t.mass)
        lse, lse_tail = (a + s.log())[..., 0], (a_tail + s_tail.log())[..., 0]
        return t.neg_entropy + t.mass * lse - (t.p * u.gather(-1, t.ids)).sum(-1) - t.tail * lse_tail

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        q, q_tail, ids, p, tail, mass = ctx.saved_tensors
        g = g / ctx.temperature
        # out of place: a retained graph may run this backward again on the same saved q
        grad = (q * (g * mass)[..., None]).addcmul_(q_tail, (g * tail)[..., None], value=-1)
        return grad.scatter_add_(-1, ids, -(g[..., None] * p)), None, None


def kl_from_targets(student_logits: Tensor, targets: KLTargets, mask: Tensor, temperature: float) -> Tensor:
    """bucketed_kl from the teacher's side kl_targets(...) (over every position the mask may
    select): with u = student_logits / T, lse = log sum_v exp u_v, log q_i = u_i - lse and
    log q_tail = lse_tail - lse (lse_tail over the ids outside the top-k),

        KL_b = sum_i p'_i log p'_i + r' log r' + (sum_i p'_i + r') lse - sum_i p'_i u_i - r' lse_tail.

    Per-clip mean over mask, times T^2."""
    with _no_autocast(student_logits):
        return _masked_mean(_BucketedKL.apply(student_logits, targets, temperature), mask) * temperature**2


class _LinearBucketedKL(torch.autograd.Function):
    """sum_n c_n KL_b(h_n W^T) over rows h_n [N, D] (see linear_kl), with its gradients on h and W computed in
    the forward pass, one chunk of rows at a time: no [N, V] tensor ever exists, and each chunk's logits
    are read about seven times (max, exp in place, two sums, one scaled gradient) instead of the fourteen
    passes of logits -> _BucketedKL. Per chunk, with a the row max, e = exp((s - a) / T) in place,
    S = sum e, S_tail = the same sum with the top-k ids zeroed (exact: a sum of the tail's own terms),

        KL_b = sum p' log p' + r' log r' + mass (a / T + log S) - sum p'_i s_i / T - r' (a / T + log S_tail),
        dKL_b/ds = (e (mass / S - r' / S_tail) + [e r' / S_tail at the top-k ids] - p' at the ids) / T.

    A row whose tail underflows against its max (S_tail below 1e-30) is recomputed exactly by _BucketedKL."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, t: KLTargets, mask: Tensor, temperature: float,
                chunk: int) -> Tensor:
        grads, ctx.weight_dtype = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], weight.dtype
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        clips = mask.sum(-1, keepdim=True).clamp_min(1).expand_as(mask)
        scale = (temperature**2 / (len(mask) * clips))[mask].float()  # d(the batch's KL) / d(a row's KL)
        values = []
        for i in range(0, len(rows), chunk):
            h, c = rows[i : i + chunk], KLTargets(*(x[i : i + chunk] for x in t))
            logits = F.linear(h, weight).float()  # the one [chunk, V] buffer: every pass below is in place
            s_ids = logits.gather(-1, c.ids)
            a = logits.amax(-1, keepdim=True)
            e = logits.sub_(a).mul_(1 / temperature).exp_()
            total_sum = e.sum(-1)
            e_cover = e.gather(-1, c.cover)
            tail_sum = e.scatter_(-1, c.cover, 0.0).sum(-1)
            e.scatter_(-1, c.cover, e_cover)
            lse, lse_tail = a[:, 0] / temperature + total_sum.log(), a[:, 0] / temperature + tail_sum.log()
            has_tail = c.tail > 0
            kl = (c.neg_entropy + c.mass * lse - (c.p * s_ids).sum(-1) / temperature
                  - torch.where(has_tail, c.tail * lse_tail, 0.0))
            exact = has_tail & (tail_sum < 1e-30)  # the tail underflowed against the row's max
            if exact.any():
                kl = kl.masked_scatter(exact, _BucketedKL.apply(
                    F.linear(h[exact], weight), KLTargets(*(x[exact] for x in c)), temperature))
            values.append(kl)
            if not grads:
                continue
            w = scale[i : i + chunk] / temperature
            tail = torch.where(has_tail & ~exact, c.tail / tail_sum, 0.0)
            g = e.mul_((w * (c.mass / total_sum - tail))[:, None])  # e is now the gradient of the chunk's logits
            g.scatter_(-1, c.cover, e_cover * (w * c.mass / total_sum)[:, None])  # no tail term at the top-k ids
            g.scatter_add_(-1, c.ids, -(w[:, None] * c.p))
            if exact.any():
                with torch.enable_grad():
                    s = F.linear(h[exact], weight).float().detach().requires_grad_(True)
                    torch.autograd.backward(_BucketedKL.apply(s, KLTargets(*(x[exact] for x in c)), temperature),
                                            scale[i : i + chunk][exact])
                g[exact] = s.grad
            if grad_rows is not None:
                grad_rows[i : i + chunk] = g.to(weight.dtype) @ weight
            if grad_weight is not None and h.dtype == g.dtype and not torch.is_autocast_enabled(h.device.type):
                grad_weight.addmm_(g.T, h)  # in place: no [V, D] product per chunk
            elif grad_weight is not None:  # bf16 products (autocast), accumulated in float32
                grad_weight += (g.to(h.dtype).T @ h).float()
        ctx.save_for_backward(grad_rows, grad_weight)
        per_row = torch.zeros(mask.shape, dtype=torch.float32, device=rows.device)
        per_row[mask] = torch.cat(values) if values else per_row[mask]
        return _masked_mean(per_row, mask).mean() * temperature**2  # summed as kl_from_targets sums

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        grad_rows, grad_weight = ctx.saved_tensors
        return (grad_rows * g if grad_rows is not None else None,
                (grad_weight * g).to(ctx.weight_dtype) if grad_weight is not None else None, None, None, None, None)


def linear_kl(hidden: Tensor, weight: Tensor, targets: KLTargets, mask: Tensor, temperature: float,
              chunk_bytes: int = 2**28) -> Tensor:
    """kl_from_targets(hidden @ weight^T, targets, mask, T).mean() -- the batch's bucketed KL from the LLM's
    last hidden states [B, L, D] and the output layer's weight [V, D] -- without the [B, L, V] logits: the
    rows the mask selects go through the output layer `chunk_bytes` of fp32 logits at a time (the Liger-kernel
    idea of fused linear losses: each chunk's gradient is taken at once and only [N, D] and [V, D] kept).
    The matrix products follow the caller's autocast (bf16 on CUDA); the softmax maths is float32. Each chunk
    adds its share to the [V, D] gradient of the weight, so chunks are large (256 MB: 441 rows at 151,936 ids)."""
    m = mask.bool()
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    return _LinearBucketedKL.apply(hidden[m], weight, KLTargets(*(x[m] for x in targets)), m, temperature, chunk)


def bucketed_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Reference (no stage calls it). T^2 * KL(p || q) over the buckets {teacher top-k ids} + one tail bucket.

    student_logits [B, L, V]; teacher_topk_ids [B, L, k] (long) with
    teacher_topk_logprobs [B, L, k] = log_softmax(teacher_logits / T) at those ids;
    mask [B, L] bool. With q = softmax(student_logits / T), r = 1 - sum_i p_i and
    q_tail = 1 - sum_i q_i (over the top-k ids):

        KL_b = sum_i p_i (log p_i - log q_i) + r (log r - log q_tail),   0 log 0 = 0.

    By the data-processing inequality KL_b <= the full KL; with k = V it is the full
    KL. The result is multiplied by T^2 (Hinton et al.: keeps gradient magnitudes
    comparable across temperatures). Returns the per-clip mean over masked positions,
    float32 [B] (0 for clips with no positions).

    Vocabulary mismatch: teacher ids >= V (outside the student's vocabulary) are
    dropped and the remaining teacher buckets (kept top-k and tail) are renormalised
    by z = 1 - (dropped mass). Teacher tail mass on ids >= V cannot be told apart and
    stays in the tail -- except when the kept ids cover all V student ids, where the
    whole tail must lie beyond V and is dropped too (so k >= V gives the dense KL of
    the teacher restricted to the student's vocabulary).

    q_tail is computed exactly as a log-sum-exp over the non-top-k student logits,
    not as 1 - sum (which loses precision when the student is confident). Everything
    that depends only on the teacher is kl_targets (computed once per clip in
    training); the student's side is kl_from_targets.
    """
    targets = kl_targets(teacher_topk_ids, teacher_topk_logprobs, mask, student_logits.shape[-1])
    return kl_from_targets(student_logits, targets, mask, temperature)


# --------------------------------------------------------------------------- CE


def answer_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], input_ids: Tensor,
                         answer_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the answer tokens.

    answer_mask [B, S] marks the positions p whose next token input_ids[:, p + 1] is an answer
    token (label tokens and end of turn); hidden [B, S, D] are the LLM's last hidden states and
    `head` its output layer, applied to the answer positions only (a handful of rows, not B x S x V
    logits). The cross-entropy is computed in float32.
    """
    logits = head(hidden[:, :-1][answer_mask[:, :-1]])
    with _no_autocast(logits):
        return F.cross_entropy(logits.float(), input_ids[:, 1:][answer_mask[:, :-1]])
