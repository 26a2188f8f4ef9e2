"""distill.label_fraction: the student's CE sees the labels of a share of the training clips, the
distillation terms every clip. Which clips keep their labels (checked by counting and by its invariances),
and that nothing learned from a clip without its label depends on that label."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pldistill_cli.data import labelled_clips

IDS = [f"spk{s}-{label}-{n}" for s in range(6) for label in ("happy", "sad", "angry") for n in range(5)]
LABELS = [i.split("-")[1] for i in IDS]


@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.5, 1.0])
def test_each_class_keeps_its_share_of_labels_and_at_least_one(fraction):
    kept = labelled_clips(IDS, LABELS, fraction)
    per_class = Counter(label for label, k in zip(LABELS, kept) if k)
    assert per_class == {label: max(1, round(fraction * 30)) for label in ("happy", "sad", "angry")}


def test_the_choice_depends_on_the_clips_only_and_grows_with_the_fraction():
    kept = dict(zip(IDS, labelled_clips(IDS, LABELS, 0.25)))
    order = list(range(len(IDS)))
    random.Random(0).shuffle(order)
    shuffled = labelled_clips([IDS[i] for i in order], [LABELS[i] for i in order], 0.25)
    assert {IDS[i]: bool(k) for i, k in zip(order, shuffled)} == kept  # not their order
    more = dict(zip(IDS, labelled_clips(IDS, LABELS, 0.5)))
    assert all(more[i] for i, k in kept.items() if k) and sum(more.values()) > sum(kept.values())
    # spread over speakers, not the first clips listed: a hash order, so every speaker keeps some labels here
    assert len({i.split("-")[0] for i, k in kept.items() if k}) > 3


@pytest.fixture(scope="module")
def setup(tiny_teacher):
    from pldistill_cli.labels import label_set
    from pldistill_cli.prompt import PromptLayout
    from test_methods import cached_clips

    prompt = PromptLayout.from_processor(tiny_teacher[1], label_set("synthetic"))
    by_length = {}
    for label in prompt.labels:
        by_length.setdefault(len(prompt.answer_ids(label)), []).append(label)
    pair = next(labels for labels in by_length.values() if len(labels) > 1)[:2]  # two labels, answers of one length
    student, items, prompt, weight, bias = cached_clips(tiny_teacher, [(7, pair[0]), (5, "Sad"), (9, "Happy")])
    return student, items, prompt, pair, weight, bias


def _relabelled(item: dict, prompt, label: str) -> dict:
    """The clip with another label's answer tokens, and the teacher's targets past the first answer position redrawn."""
    import torch

    n = len(prompt.answer_ids(label))
    ids = item["input_ids"].clone()
    ids[-n:] = torch.tensor(prompt.answer_ids(label))
    logprobs = item["topk_logprobs"].clone()
    first = len(ids) - 1 - n  # the position whose next token is the first answer token
    logprobs[first + 1:] = torch.log_softmax(torch.randn_like(logprobs[first + 1:]), -1)
    return {**item, "label": label, "input_ids": ids, "topk_logprobs": logprobs}


@pytest.mark.parametrize("method", ["ce", "kd", "ldist", "pl-distill"])
def test_nothing_learned_from_a_clip_without_its_label_depends_on_that_label(setup, method):
    import torch

    from pldistill_cli.methods import METHODS
    from pldistill_cli.terms import TargetCollate, Teacher, distillation_terms

    student, items, prompt, pair, weight, bias = setup
    teacher = Teacher.of(weight, bias, 2.0)
    adapter = torch.nn.Linear(1, 1)

    def loss_and_grad(batch_items, labelled):
        student.zero_grad()
        batch = TargetCollate(prompt)([{**item, "labelled": k} for item, k in zip(batch_items, labelled)])
        terms = distillation_terms(student, batch, METHODS[method], teacher, 1.0, 1.0, adapter)
        terms["loss"].backward()
        return terms, torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    other = [_relabelled(items[0], prompt, pair[1]), *items[1:]]
    for labelled, same in (((False, True, True), True), ((True, True, True), False)):
        (terms, grad), (terms_other, grad_other) = loss_and_grad(items, labelled), loss_and_grad(other, labelled)
        assert torch.allclose(grad, grad_other, atol=1e-6) == same, (labelled, method)
    # CE of the batch with clip 0 unlabelled is the CE of clips 1 and 2 alone
    alone, _ = loss_and_grad(items[1:], (True, True))
    assert terms_other["ce"].item() != pytest.approx(alone["ce"].item())  # all labelled: clip 0 counts
    unlabelled, _ = loss_and_grad(items, (False, True, True))
    assert unlabelled["ce"].item() == pytest.approx(alone["ce"].item(), rel=1e-5)
