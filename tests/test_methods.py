"""Each distillation method switches on exactly the loss terms of its row in the README's table:
checked by which cached targets move the student's gradients, and which cache columns it reads."""

import pytest
import torch

from pldistill_cli.methods import METHODS, TargetCollate, distillation_terms
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.labels import label_set
from pldistill_cli.losses import topk_logprobs
from pldistill_cli.models import assemble_student, build_student_llm, get_preset

# which perturbed target may change the gradient: KL at answer positions, KL elsewhere, attention w, teacher features
EXPECTED = {
    "ce": set(),
    "kd": {"kl_answer"},
    "ldist": {"kl_answer", "kl_other"},
    "pdist": {"attention", "teacher"},
    "fitnets": {"kl_answer", "kl_other", "teacher"},
    "cka": {"kl_answer", "kl_other", "teacher"},
    "pl-distill": {"kl_answer", "kl_other", "attention", "teacher"},
}


@pytest.fixture(scope="module")
def setup(tiny_teacher):
    teacher, processor = tiny_teacher
    prompt = PromptLayout.from_processor(processor, label_set("synthetic"))
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(get_preset("tiny"), len(processor.tokenizer), 0), 0)
    g = torch.Generator().manual_seed(0)
    items = []
    for i, (t, label) in enumerate([(7, "Happy"), (5, "Surprise"), (9, "Sad")]):
        ids = torch.tensor(prompt.prompt_ids(t) + list(prompt.answer_ids(label)))
        ids_k, lp_k = topk_logprobs(torch.randn(len(ids) - 1, len(processor.tokenizer), generator=g), 4, 2.0)
        items.append({"index": i, "label": label, "input_ids": ids,
                      "encoded": torch.randn(t, teacher.config.audio_config.d_model, generator=g),
                      "attention": torch.rand(t, generator=g), "topk_ids": ids_k, "topk_logprobs": lp_k})
    batch = TargetCollate(prompt)(items)
    d_teacher = teacher.config.text_config.hidden_size
    weight, bias = torch.randn(d_teacher, teacher.config.audio_config.d_model, generator=g), torch.zeros(d_teacher)
    return student, batch, weight, bias


def _gradient(student, batch, method, weight, bias, adapter):
    student.zero_grad()
    adapter.zero_grad()
    terms = distillation_terms(student, batch, METHODS[method], weight, bias, 1.0, 1.0, 2.0, adapter)
    terms["loss"].backward()
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]), set(terms)


def _perturbed(batch, weight, what):
    batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    answer = batch["answer_mask"][:, :-1]
    if what in ("kl_answer", "kl_other"):
        where = answer if what == "kl_answer" else batch["kl_mask"] & ~answer
        batch["topk_logprobs"][where] = torch.log_softmax(torch.randn_like(batch["topk_logprobs"][where]), -1)
    if what == "attention":
        batch["attention"] = torch.rand_like(batch["attention"]) ** 4
    return batch, (weight + torch.randn_like(weight) if what == "teacher" else weight)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_gradients_depend_on_exactly_its_targets(setup, method):
    student, batch, weight, bias = setup
    torch.manual_seed(0)
    adapter = torch.nn.Linear(student.config.text_config.hidden_size, weight.shape[0])
    base, terms = _gradient(student, batch, method, weight, bias, adapter)
    moved = set()
    for what in ("kl_answer", "kl_other", "attention", "teacher"):
        changed_batch, changed_weight = _perturbed(batch, weight, what)
        grad, _ = _gradient(student, changed_batch, method, changed_weight, bias, adapter)
        if not torch.allclose(grad, base, atol=1e-7, rtol=1e-5):
            moved.add(what)
    assert moved == EXPECTED[method]
    assert ("kl" in terms) == bool(EXPECTED[method] & {"kl_answer"})


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_read_only_the_cache_columns_they_need(method):
    columns = set(METHODS[method].columns)
    assert ({"topk_ids", "topk_logprobs"} <= columns) == ("kl_answer" in EXPECTED[method])
    assert ("attention" in columns) == ("attention" in EXPECTED[method])
