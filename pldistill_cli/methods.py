"""Distillation methods as data: each method is one row of METHODS (the loss terms it switches on, from
which its weights and the cache columns it reads follow); terms.distillation_terms computes any row's loss
terms. A new method is one entry. No torch here: the CLI and params.yaml's validation read this table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

KL = Literal["answer", "all"]  # KD: the answer positions; LDist: every audio and text position
PROJECTOR = Literal["aw_cka", "cka", "fitnets"]  # AW-CKA, CKA with uniform weights, MSE via a learned adapter


@dataclass(frozen=True)
class Method:
    """Which loss terms a method switches on (CE is always on)."""

    kl: Optional[KL]
    projector: Optional[PROJECTOR]

    @property
    def weights(self) -> tuple[str, ...]:
        """The settings that weight its terms (`distill.weights.<method>` in params.yaml): lambda_p the
        projector term, lambda_l the KL, and cka_estimator the estimator of a CKA term."""
        return (("lambda_p",) * bool(self.projector) + ("lambda_l",) * bool(self.kl)
                + ("cka_estimator",) * (self.projector in ("aw_cka", "cka")))

    @property
    def columns(self) -> tuple[str, ...]:
        """The cache columns the method reads."""
        cols = ["id", "label", "split", "n_audio", "input_ids"]  # + encoder output, from the encoder store
        cols += ["topk_ids", "topk_logprobs"] if self.kl else []
        cols += ["attention"] if self.projector == "aw_cka" else []
        return tuple(cols)


METHODS = {
    "ce": Method(None, None),
    "kd": Method("answer", None),
    "ldist": Method("all", None),
    "pdist": Method(None, "aw_cka"),
    "fitnets": Method("all", "fitnets"),
    "cka": Method("all", "cka"),
    "pl-distill": Method("all", "aw_cka"),
}
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the closed list of method names, from the table
