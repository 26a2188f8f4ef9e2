"""The loss terms of a batch of cached targets: batching the cache's rows (TargetCollate), what the cached
teacher contributes (Teacher), and one function that computes any method's terms (distillation_terms) for
a row of methods.METHODS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from .forward import forward_from_encoder, step_mask
from .losses import (KLTargets, TeacherSide, answer_cross_entropy, aw_cka_gram, aw_cka_teacher, kl_targets,
                     linear_kl, teacher_factor, teacher_side)
from .methods import Method
from .prompt import PromptLayout


# The teacher's constants of a clip (Teacher.constants), kept per cached row for a whole run: AW-CKA's
# teacher side (its normaliser, its features Y and step weights w) and the KL's buckets.
CONSTANTS = ("teacher_norm", "cka_y", "cka_w", *(f"kl_{name}" for name in KLTargets._fields))


class TargetCollate:
    """Pads cached rows into a batch (right padding); attention, top-k and the teacher's constants only
    where the rows carry them."""

    def __init__(self, prompt: PromptLayout):
        self.prompt = prompt

    def __call__(self, items: list[dict]) -> dict:
        b = len(items)
        lengths = [len(i["encoded"]) for i in items]
        t_max, s_max = max(lengths), max(len(i["input_ids"]) for i in items)
        out = {
            "index": torch.tensor([i["index"] for i in items]),
            "labels": [i["label"] for i in items],
            "labelled": torch.tensor([i.get("labelled", True) for i in items]),
            "encoded": torch.zeros(b, t_max, items[0]["encoded"].shape[1]),
            "lengths": torch.tensor(lengths),
            "input_ids": torch.full((b, s_max), self.prompt.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(b, s_max, dtype=torch.long),
            "answer_mask": torch.zeros(b, s_max, dtype=torch.bool),
            "kl_mask": torch.zeros(b, s_max - 1, dtype=torch.bool),
        }
        for key in CONSTANTS:  # [] -> [B]; [T, ...] or [S - 1, ...] -> zero-padded [B, T_max or S_max - 1, ...]
            if key in items[0]:
                values = [i[key] for i in items]
                out[key] = torch.stack(values) if values[0].dim() == 0 else pad_sequence(values, batch_first=True)
        if "attention" in items[0]:
            out["attention"] = torch.zeros(b, t_max)
        if "gram" in items[0]:
            out["gram"] = torch.zeros(b, t_max, t_max)
        if "topk_ids" in items[0]:
            k = items[0]["topk_ids"].shape[1]
            out["topk_ids"] = torch.zeros(b, s_max - 1, k, dtype=torch.long)
            out["topk_logprobs"] = torch.zeros(b, s_max - 1, k)
        for j, item in enumerate(items):
            t, s = lengths[j], len(item["input_ids"])
            a = len(self.prompt.answer_ids(item["label"]))
            out["encoded"][j, :t] = item["encoded"]
            out["input_ids"][j, :s] = item["input_ids"]
            out["attention_mask"][j, :s] = 1
            out["answer_mask"][j, s - 1 - a : s - 1] = True
            # a clip without its label: no position that reads an answer token (the prediction of the first
            # is the last), so nothing learned from it depends on its label
            out["kl_mask"][j, : s - 1 if item.get("labelled", True) else s - a] = True
            for key, width in (("attention", t), ("topk_ids", s - 1), ("topk_logprobs", s - 1)):
                if key in out:
                    out[key][j, :width] = item[key]
            if "gram" in out:
                out["gram"][j, :t, :t] = item["gram"]
        return out


@dataclass(frozen=True)
class Teacher:
    """What a cached teacher contributes: its projector Z_T = X W^T + b (for FitNets' MSE), the
    encoder-space factor F of [W | b] through which AW-CKA never forms Z_T (losses.teacher_factor),
    the temperature of its cached log-probabilities, and the CKA estimator (biased | debiased)."""

    weight: torch.Tensor
    bias: torch.Tensor
    factor: torch.Tensor
    temperature: float
    estimator: str = "biased"

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor, temperature: float, estimator: str = "biased") -> "Teacher":
        return cls(weight, bias, teacher_factor(weight, bias), temperature, estimator)

    def to(self, device) -> "Teacher":
        return Teacher(self.weight.to(device), self.bias.to(device), self.factor.to(device), self.temperature,
                       self.estimator)

    def features(self, encoded: torch.Tensor) -> torch.Tensor:
        return encoded.float() @ self.weight.T + self.bias

    def cka_weights(self, method: Method, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        return batch["attention"] if method.projector == "aw_cka" else mask.float()

    def side(self, method: Method, batch: dict) -> TeacherSide:
        """AW-CKA's teacher side of the batch: as kept by Teacher.constants, or computed now
        (losses.teacher_side, no gradient) with the normaliser computed once if there is one."""
        mask = step_mask(batch["lengths"], batch["encoded"].shape[1])
        if "cka_y" in batch:
            return TeacherSide(batch["cka_y"], batch["cka_w"], mask, batch["teacher_norm"], self.estimator)
        return teacher_side(batch["encoded"], self.factor, self.cka_weights(method, batch, mask), mask,
                            estimator=self.estimator, norm=batch.get("teacher_norm"))

    def kl(self, batch: dict, vocab: int) -> KLTargets:
        """The KL's buckets over the student's `vocab` at every position: as kept, or computed now."""
        if "kl_p" in batch:
            return KLTargets(*(batch[f"kl_{name}"] for name in KLTargets._fields))
        return kl_targets(batch["topk_ids"], batch["topk_logprobs"], batch["kl_mask"], vocab)

    def constants(self, method: Method, batch: dict, vocab: int) -> list[dict[str, torch.Tensor]]:
        """Per clip of a collated batch, unpadded: what the teacher contributes that is a constant of the
        clip (AW-CKA's teacher side, the KL's buckets), to compute once and keep for a whole run, so that
        a training step computes only the student's side (CONSTANTS)."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in batch["labels"]]
        steps, positions = batch["lengths"].tolist(), (batch["attention_mask"].sum(-1) - 1).tolist()
        if method.projector in ("aw_cka", "cka") and "gram" not in batch:
            side = self.side(method, batch)
            for i, row in enumerate(out):
                row.update(teacher_norm=side.norm[i].clone(), cka_y=side.y[i, : steps[i]].clone(),
                           cka_w=side.w[i, : steps[i]].clone())  # clones: a view would keep the padded batch
        if method.kl:
            for name, value in self.kl(batch, vocab)._asdict().items():
                for i, row in enumerate(out):
                    row[f"kl_{name}"] = value[i, : positions[i]].clone()
        return out


def weighted(terms: dict[str, torch.Tensor], lambda_p: float, lambda_l: float) -> dict[str, torch.Tensor]:
    """The summands of the loss from a method's terms: CE, lambda_P (1 - CKA) (or lambda_P MSE for FitNets) and
    lambda_L KL, each where the method has that term (their sum is the loss; distill's probe weighs each)."""
    out = {"ce": terms["ce"]}
    if "cka" in terms:
        out["projector"] = lambda_p * (1 - terms["cka"])
    elif "mse" in terms:
        out["projector"] = lambda_p * terms["mse"]
    if "kl" in terms:
        out["kl"] = lambda_l * terms["kl"]
    return out


def distillation_terms(student, batch: dict, method: Method, teacher: Teacher, lambda_p: float, lambda_l: float,
                       adapter: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The method's loss terms and their weighted sum for one batch of cached targets:
    loss = CE + lambda_P (1 - CKA) (or lambda_P MSE for FitNets) + lambda_L KL (`weighted`)."""
    hidden, projected, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                                batch["attention_mask"], logits=False)
    head = student.get_output_embeddings()  # the LM head: logits only where a term reads them
    answers = batch["answer_mask"] & batch["labelled"][:, None]  # CE reads only the clips with their label
    terms = {"ce": answer_cross_entropy(hidden, head, batch["input_ids"], answers) if answers.any()
             else hidden.sum() * 0}
    if method.projector:
        mask = step_mask(batch["lengths"], projected.shape[1])
        if method.projector == "fitnets":
            error = (adapter(projected.float()) - teacher.features(batch["encoded"])).square().mean(-1)
            terms["mse"] = (error * mask).sum() / mask.sum()
        else:
            if "gram" in batch:  # a gram cache: the teacher side is its raw Gram K = Z Z^T
                cka = aw_cka_gram(projected, batch["gram"], teacher.cka_weights(method, batch, mask), mask,
                                  estimator=teacher.estimator)
            else:  # exact, in encoder space: never forms Z_T
                cka = aw_cka_teacher(projected, teacher.side(method, batch))
            terms["cka"] = cka.mean()
    if method.kl:
        positions = batch["kl_mask"] if method.kl == "all" else batch["answer_mask"][:, :-1] & batch["kl_mask"]
        terms["kl"] = linear_kl(hidden[:, :-1], head.weight, teacher.kl(batch, head.weight.shape[0]), positions,
                                teacher.temperature)
    ce, *others = weighted(terms, lambda_p, lambda_l).values()
    return {"loss": sum(others, ce), **terms}  # CE + projector + KL, added in this order
