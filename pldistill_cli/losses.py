"""Distillation losses: attention-weighted CKA for hidden states, bucketed KL for logits.

All functions are pure and differentiable w.r.t. the student; the maths is done in
float32 with autocast disabled, whatever the input dtype or the caller's autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny
_MIN = torch.finfo(torch.float32).min


def _no_autocast(t: Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


# --------------------------------------------------------------------------- AW-CKA


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


def _centre_features(z: Tensor, w: Tensor, m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Zc = diag(sqrt(w)) (Z - 1 mu^T), mu = w^T Z; plus a per-clip 'degenerate' flag.

    Features are zeroed on masked steps and divided by their (detached) max |value|,
    which leaves CKA unchanged (scale invariance) but keeps float32 far from overflow.
    A side is degenerate (constant features) when its weighted variance tr(G) is at most
    eps times its uncentred weighted second moment sum_t w_t ||z_t||^2.
    """
    z = torch.where(m[..., None], z.float(), 0.0)
    z = z / z.abs().amax(dim=(1, 2), keepdim=True).clamp_min(_TINY).detach()
    mu = torch.einsum("bt,btd->bd", w, z)
    zc = w.sqrt()[..., None] * (z - mu[:, None, :])
    var = zc.square().sum(dim=(1, 2))
    raw = (w[..., None] * z.square()).sum(dim=(1, 2))
    return zc, var <= eps * raw


def _centre_gram(k: Tensor, w: Tensor, m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """G = D C K C^T D with C = I - 1 w^T, D = diag(sqrt(w)); same flag as features.

    C K C^T = K - (K w) 1^T - 1 (w^T K) + (w^T K w) 1 1^T.
    """
    k = torch.where(m[:, :, None] & m[:, None, :], k.float(), 0.0)
    k = k / k.abs().amax(dim=(1, 2), keepdim=True).clamp_min(_TINY).detach()
    kw = k @ w[..., None]  # [B, T, 1]
    wk = w[:, None, :] @ k  # [B, 1, T]
    wkw = wk @ w[..., None]  # [B, 1, 1]
    sw = w.sqrt()
    g = sw[:, :, None] * (k - kw - wk + wkw) * sw[:, None, :]
    var = g.diagonal(dim1=1, dim2=2).sum(-1)
    raw = (w * k.diagonal(dim1=1, dim2=2)).sum(-1)
    return g, var <= eps * raw


def _gram_terms(gs: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(<G_S, G_T>_F, ||G_S||_F^2, ||G_T||_F^2) from T x T Grams."""
    return (gs * gt).sum(dim=(1, 2)), gs.square().sum(dim=(1, 2)), gt.square().sum(dim=(1, 2))


def _feature_terms(zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Same terms via D x D cross-products: <G_S, G_T> = ||Zs^T Zt||^2, ||G|| = ||Z^T Z||."""
    cross = zs.mT @ zt
    return (
        cross.square().sum(dim=(1, 2)),
        (zs.mT @ zs).square().sum(dim=(1, 2)),
        (zt.mT @ zt).square().sum(dim=(1, 2)),
    )


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
) -> Tensor:
    """Attention-weighted linear CKA per clip.

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
    """
    with _no_autocast(student):
        w, m = _step_weights(weights, mask)
        zs, deg_s = _centre_features(student, w, m, eps)
        zt, deg_t = _centre_features(teacher, w, m, eps)
        t, ds, dt = zs.shape[1], zs.shape[2], zt.shape[2]
        if t * (ds + dt) <= ds * ds + ds * dt + dt * dt:
            terms = _gram_terms(zs @ zs.mT, zt @ zt.mT)
        else:
            terms = _feature_terms(zs, zt)
        return _safe_cka(*terms, deg_s | deg_t)


def aw_cka_gram(
    student: Tensor,
    teacher_gram: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """AW-CKA with the teacher given as its raw Gram K = Z_T Z_T^T [B, T, T].

    Raw means uncentred and unweighted (e.g. cached once per clip). Centring on the Gram:
    C = I - 1 w^T, D = diag(sqrt(w)), G_T = D C K C^T D. Equals
    aw_cka(student, teacher, weights, mask, eps) up to float error.
    """
    with _no_autocast(student):
        w, m = _step_weights(weights, mask)
        zs, deg_s = _centre_features(student, w, m, eps)
        gt, deg_t = _centre_gram(teacher_gram, w, m, eps)
        return _safe_cka(*_gram_terms(zs @ zs.mT, gt), deg_s | deg_t)


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
    """Dense T^2 * KL(p || q), p = softmax(teacher / T), q = softmax(student / T).

    Per-clip mean over masked positions, float32 [B] (0 for clips with no positions).
    """
    with _no_autocast(student_logits):
        logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
        logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p = logp.exp()
        kl = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        return _masked_mean(kl, mask) * temperature**2


def bucketed_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """T^2 * KL(p || q) over the buckets {teacher top-k ids} + one tail bucket.

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
    by 1 - (dropped mass). Teacher tail mass on ids >= V cannot be told apart and stays
    in the tail -- except when the kept ids cover all V student ids, where the whole
    tail must lie beyond V and is dropped too (so k >= V gives the dense KL of the
    teacher restricted to the student's vocabulary).

    q_tail is computed exactly as a log-sum-exp over the non-top-k student logits,
    not as 1 - sum (which loses precision when the student is confident); this costs
    one temporary of the size of student_logits.
    """
    with _no_autocast(student_logits):
        vocab = student_logits.shape[-1]
        logq = F.log_softmax(student_logits.float() / temperature, dim=-1)

        m = mask.bool()[..., None]
        keep = m & (teacher_topk_ids >= 0) & (teacher_topk_ids < vocab)
        ids = torch.where(keep, teacher_topk_ids, 0)
        logp = torch.where(m, teacher_topk_logprobs.float(), _MIN)  # no mass on padding
        p = logp.exp()
        kept_mass = torch.where(keep, p, 0.0).sum(-1)
        dropped_mass = torch.where(keep, 0.0, p).sum(-1)
        covered = torch.zeros_like(logq).scatter_add_(-1, ids, keep.float()) > 0
        full_cover = covered.sum(-1) >= vocab
        r = torch.where(full_cover, 0.0, (1.0 - kept_mass - dropped_mass).clamp_min(0.0))
        z = kept_mass + r  # = 1 - dropped mass: normaliser of the kept buckets
        valid = z > 0  # some teacher mass left in the student's vocabulary
        z = torch.where(valid, z, 1.0)

        # Top-k buckets.
        logq_k = logq.gather(-1, ids)
        head = torch.where(keep & (p > 0), p * (logp - logq_k), 0.0).sum(-1)
        # Tail bucket: log q_tail = logsumexp of log q over ids outside the top-k.
        logq_tail = torch.logsumexp(logq.masked_fill(covered, _MIN), dim=-1)
        safe_r = torch.where(r > 0, r, 1.0)
        tail = torch.where(r > 0, r * (safe_r.log() - logq_tail), 0.0)

        # Renormalised p' = p / z, r' = r / z:  KL' = (head + tail) / z - log z.
        kl = torch.where(valid, (head + tail) / z - z.log(), 0.0)
        return _masked_mean(kl, mask) * temperature**2


# --------------------------------------------------------------------------- CE


def answer_cross_entropy(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the answer tokens.

    answer_mask [B, S] marks the positions p whose next token input_ids[:, p + 1] is an answer
    token (label tokens and end of turn); logits [B, S, V]. Computed in float32.
    """
    with _no_autocast(logits):
        targets = input_ids[:, 1:][answer_mask[:, :-1]]
        return F.cross_entropy(logits[:, :-1][answer_mask[:, :-1]].float(), targets)
