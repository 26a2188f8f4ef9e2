"""Each distillation method is its row of the README's table, with the paper's loss composition:
checked against sums computed independently (CE by hand from the answer tokens' log-probabilities),
by which cached targets move the student's gradients, and by which cache columns it reads."""

import dataclasses
from pathlib import Path
from typing import get_args

import pytest
import torch

from pldistill_cli.config import DistillParams
from pldistill_cli.forward import forward_from_encoder, step_mask
from pldistill_cli.labels import label_set
from pldistill_cli.losses import KLTargets, aw_cka, bucketed_kl, topk_logprobs
from pldistill_cli.methods import METHODS
from pldistill_cli.models import assemble_student, build_student_llm, get_preset
from pldistill_cli.prompt import PromptLayout
from pldistill_cli.terms import CONSTANTS, TargetCollate, Teacher, distillation_terms, weighted

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
CLIPS = [(7, "Happy"), (5, "Surprise"), (9, "Sad")]  # audio steps, label


def cached_clips(tiny_teacher, clips: list[tuple[int, str]]):
    """A tiny student, the cached rows of `clips` (audio steps, label) with random targets, the prompt and a
    random teacher projector (weight, bias)."""
    teacher, processor = tiny_teacher
    prompt = PromptLayout.from_processor(processor, label_set("synthetic"))
    student = assemble_student(teacher.config.audio_config, teacher.model.audio_tower.state_dict(),
                               teacher.config.audio_token_index,
                               build_student_llm(get_preset("tiny"), len(processor.tokenizer), 0), 0)
    g = torch.Generator().manual_seed(0)
    items = []
    for i, (t, label) in enumerate(clips):
        ids = torch.tensor(prompt.prompt_ids(t) + list(prompt.answer_ids(label)))
        ids_k, lp_k = topk_logprobs(torch.randn(len(ids) - 1, len(processor.tokenizer), generator=g), 4, 2.0)
        items.append({"index": i, "label": label, "input_ids": ids,
                      "encoded": torch.randn(t, teacher.config.audio_config.d_model, generator=g),
                      "attention": torch.rand(t, generator=g), "topk_ids": ids_k, "topk_logprobs": lp_k})
    d_teacher = teacher.config.text_config.hidden_size
    weight = torch.randn(d_teacher, teacher.config.audio_config.d_model, generator=g)
    return student, items, prompt, weight, 0.1 * torch.randn(d_teacher, generator=g)


@pytest.fixture(scope="module")
def setup(tiny_teacher):
    student, items, prompt, weight, bias = cached_clips(tiny_teacher, CLIPS)
    return student, TargetCollate(prompt)(items), weight, bias, prompt


def test_the_method_table_is_the_only_list_of_methods():
    """params.yaml's methods, their `distill.weights.<method>` and the CLI's --method choices all come from
    METHODS; no module of the package writes a second list of method names (3 or more in one literal)."""
    import ast

    from pldistill_cli.cli import Method as CliMethod
    from pldistill_cli.config import Params

    assert set(get_args(get_args(Params.__pydantic_fields__["methods"].annotation)[0])) == set(METHODS)
    weights = DistillParams().weights
    assert {m: tuple(dataclasses.asdict(w)) for m, w in weights.items()} == {m: r.weights for m, r in METHODS.items()}
    assert set(get_args(get_args(CliMethod)[0])) == set(METHODS)
    package = Path(__file__).resolve().parents[1] / "pldistill_cli"
    lists = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", [])
            named = {n.value for n in items if isinstance(n, ast.Constant)} & set(METHODS)
            if len(named) >= 3:
                lists.append(f"{path.name}:{node.lineno}")
    assert lists == [next(f"methods.py:{n.lineno}" for n in ast.walk(ast.parse((package / "methods.py").read_text()))
                          if isinstance(n, ast.Dict))]


def _gradient(student, batch, method, weight, bias, adapter):
    student.zero_grad()
    adapter.zero_grad()
    terms = distillation_terms(student, batch, METHODS[method], Teacher.of(weight, bias, 2.0), 1.0, 1.0, adapter)
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
    student, batch, weight, bias, _ = setup
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


def _hand_ce(logits: torch.Tensor, prompt: PromptLayout) -> torch.Tensor:
    """Mean -log p(answer token) over every answer token (label tokens and end of turn) of every clip,
    read off the logits at the position before each token: the prompt is followed by the answer."""
    losses = []
    for i, (t, label) in enumerate(CLIPS):
        start = len(prompt.prompt_ids(t))
        for j, token in enumerate(prompt.answer_ids(label)):
            losses.append(-logits[i, start + j - 1].float().log_softmax(-1)[token])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_the_total_loss_is_ce_plus_the_weighted_terms(setup, method, estimator):
    student, batch, weight, bias, prompt = setup
    lambda_p, lambda_l = 0.3, 1.7  # unequal: a swap of the two weights shows
    teacher = Teacher.of(weight, bias, 2.0, estimator)
    torch.manual_seed(0)
    adapter = torch.nn.Linear(student.config.text_config.hidden_size, weight.shape[0])
    with torch.no_grad():
        terms = distillation_terms(student, batch, METHODS[method], teacher, lambda_p, lambda_l, adapter)
        logits, projected, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                                    batch["attention_mask"])
    row = METHODS[method]
    mask = step_mask(batch["lengths"], projected.shape[1])
    expected = {"ce": _hand_ce(logits, prompt)}
    if row.projector in ("aw_cka", "cka"):  # against full teacher features X W^T + b, not the encoder-space path
        weights = batch["attention"] if row.projector == "aw_cka" else mask.float()
        expected["cka"] = aw_cka(projected, batch["encoded"] @ weight.T + bias, weights, mask, estimator=estimator).mean()
    if row.projector == "fitnets":
        error = (adapter(projected) - (batch["encoded"] @ weight.T + bias)).square().mean(-1)
        expected["mse"] = error[mask].mean()
    if row.kl:
        positions = batch["kl_mask"] if row.kl == "all" else batch["answer_mask"][:, :-1]
        expected["kl"] = bucketed_kl(logits[:, :-1], batch["topk_ids"], batch["topk_logprobs"], positions, 2.0).mean()
    total = (expected["ce"] + lambda_p * (1 - expected.get("cka", 1.0)) + lambda_p * expected.get("mse", 0.0)
             + lambda_l * expected.get("kl", 0.0))
    assert set(terms) == {"loss", *expected}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], torch.as_tensor(value), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], torch.as_tensor(total), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum(weighted(terms, lambda_p, lambda_l).values()), terms["loss"])  # distill's probe
    # a weight the method lists (`distill.weights.<method>`) changes its loss; any other weight does not
    other = Teacher.of(weight, bias, 2.0, {"biased": "debiased", "debiased": "biased"}[estimator])
    with torch.no_grad():
        for name, changed in (("lambda_p", (teacher, 2 * lambda_p, lambda_l)),
                              ("lambda_l", (teacher, lambda_p, 2 * lambda_l)), ("cka_estimator", (other, lambda_p, lambda_l))):
            loss = distillation_terms(student, batch, row, changed[0], *changed[1:], adapter)["loss"]
            assert (not torch.equal(loss, terms["loss"])) == (name in row.weights), name


def _rows(batch: dict) -> list[dict]:
    """The batch's clips as the cache's rows (unpadded)."""
    rows = []
    for i, label in enumerate(batch["labels"]):
        t, s = int(batch["lengths"][i]), int(batch["attention_mask"][i].sum())
        rows.append({"index": i, "label": label, "input_ids": batch["input_ids"][i, :s],
                     "encoded": batch["encoded"][i, :t], "attention": batch["attention"][i, :t],
                     "topk_ids": batch["topk_ids"][i, : s - 1], "topk_logprobs": batch["topk_logprobs"][i, : s - 1]})
    return rows


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_the_teachers_constants_kept_per_clip_change_nothing_and_are_used(setup, estimator):
    """Teacher.constants, computed once per clip (as distill does before training) and batched again by the
    collate in another order (other padding): the same loss terms as computing them in the step; and the
    kept ones are what the step reads (a doubled normaliser halves every CKA, empty KL buckets give KL 0)."""
    student, batch, weight, bias, prompt = setup
    teacher = Teacher.of(weight, bias, 2.0, estimator)
    vocab = student.config.text_config.vocab_size
    kept_keys = {"pdist": {"teacher_norm", "cka_y", "cka_w"}, "kd": {f"kl_{f}" for f in KLTargets._fields}}
    kept_keys["pl-distill"] = kept_keys["cka"] = kept_keys["pdist"] | kept_keys["kd"]
    with torch.no_grad():
        for method in ("pl-distill", "cka", "pdist", "kd"):
            plain = distillation_terms(student, batch, METHODS[method], teacher, 0.3, 1.7)
            kept = teacher.constants(METHODS[method], batch, vocab)
            assert set(kept[0]) == kept_keys[method] and set(kept_keys[method]) <= set(CONSTANTS)
            again = TargetCollate(prompt)([{**_rows(batch)[i], **kept[i]} for i in (2, 0, 1)])
            terms = distillation_terms(student, again, METHODS[method], teacher, 0.3, 1.7)
            assert set(terms) == set(plain)
            for key in plain:  # float32 sums in another order: the debiased HSIC's cancellation costs ~3e-6 relative
                torch.testing.assert_close(terms[key], plain[key], rtol=1e-5, atol=1e-6)
            # two of the clips, without the longest: shorter padding than the constants were computed with
            pair = [_rows(batch)[i] for i in (1, 0)]
            alone = distillation_terms(student, TargetCollate(prompt)(pair), METHODS[method], teacher, 0.3, 1.7)
            kept_pair = TargetCollate(prompt)([{**row, **kept[i]} for row, i in zip(pair, (1, 0))])
            for key, value in distillation_terms(student, kept_pair, METHODS[method], teacher, 0.3, 1.7).items():
                torch.testing.assert_close(value, alone[key], rtol=0, atol=1e-6)
            if "cka" in plain:
                doubled = {**again, "teacher_norm": 2 * again["teacher_norm"]}
                cka = distillation_terms(student, doubled, METHODS[method], teacher, 1.0, 1.0)["cka"]
                torch.testing.assert_close(cka, plain["cka"] / 2, rtol=0, atol=1e-6)
                # the kept teacher side is read, not recomputed from the encoder output
                noise = {**again, "cka_y": torch.randn_like(again["cka_y"])}
                assert abs(distillation_terms(student, noise, METHODS[method], teacher, 1.0, 1.0)["cka"]
                           - plain["cka"]) > 1e-3
                # beyond distill.teacher_memory_mb only the normaliser is kept: it is still the one used
                norm_only = {**batch, "teacher_norm": 2 * teacher.side(METHODS[method], batch).norm}
                cka = distillation_terms(student, norm_only, METHODS[method], teacher, 1.0, 1.0)["cka"]
                torch.testing.assert_close(cka, plain["cka"] / 2, rtol=0, atol=1e-6)
            if "kl" in plain:
                empty = {**again, **{f"kl_{f}": torch.zeros_like(again[f"kl_{f}"])
                                     for f in ("p", "tail", "mass", "neg_entropy")}}
                assert distillation_terms(student, empty, METHODS[method], teacher, 1.0, 1.0)["kl"] == 0


class _Rows(list):
    """Cached rows as distill reads them (CachedTargets' interface, without the Parquet files)."""

    constants: list = []

    def batches(self, batch_size: int) -> list[list[int]]:
        return [list(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]


def test_the_teachers_constants_are_kept_within_the_memory_budget(setup):
    """distill.teacher_memory_mb: within it every constant is kept (unpadded, not a view of a padded batch);
    past it only the CKA normalisers, and every step recomputes the rest."""
    from pldistill_cli.distill import teacher_constants

    student, batch, weight, bias, prompt = setup
    teacher, vocab = Teacher.of(weight, bias, 2.0), student.config.text_config.vocab_size
    everything = set(CONSTANTS)
    for memory_mb, keys in ((1, everything), (0, {"teacher_norm"})):
        rows = _Rows(_rows(batch))
        teacher_constants(rows, METHODS["pl-distill"], teacher, prompt, 2, vocab, memory_mb)
        assert [set(row) for row in rows.constants] == [keys] * len(rows)
        for row, lengths in zip(rows.constants, batch["lengths"].tolist()):
            assert row["teacher_norm"].dim() == 0 and ("cka_y" not in row or len(row["cka_y"]) == lengths)
            assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in row.values())


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_a_gram_cache_gives_the_same_terms(setup, estimator):
    """A cache holding each clip's raw teacher Gram K = Z Z^T (Z = X W^T + b on its real steps) instead of
    the encoder output: the same loss terms."""
    student, batch, weight, bias, _ = setup
    teacher = Teacher.of(weight, bias, 2.0, estimator)
    z = batch["encoded"] @ weight.T + bias
    real = step_mask(batch["lengths"], z.shape[1])[..., None].float()
    gram = (z * real) @ (z * real).mT
    with torch.no_grad():
        for method in ("pl-distill", "cka", "pdist"):
            plain = distillation_terms(student, batch, METHODS[method], teacher, 0.3, 1.7)
            cached = distillation_terms(student, {**batch, "gram": gram}, METHODS[method], teacher, 0.3, 1.7)
            assert set(cached) == set(plain)
            for key in plain:
                torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_a_clip_without_attention_weighs_its_own_steps_alike(setup, estimator):
    """A padded clip whose cached attention is all 0 falls back to uniform weights over its real audio
    steps, not over the padding: the same CKA and teacher normaliser as that clip alone, unpadded."""
    student, batch, weight, bias, _ = setup
    teacher = Teacher.of(weight, bias, 2.0, estimator)
    zeroed = {**batch, "attention": batch["attention"].clone()}
    zeroed["attention"][1] = 0  # clip 1: 5 of 9 steps real
    t = int(batch["lengths"][1])
    alone = {k: v[1:2] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    alone.update(encoded=alone["encoded"][:, :t], attention=torch.ones(1, t), lengths=alone["lengths"])
    with torch.no_grad():
        norms = teacher.side(METHODS["pl-distill"], zeroed).norm
        torch.testing.assert_close(norms[1:2], teacher.side(METHODS["pl-distill"], alone).norm, rtol=1e-5, atol=1e-6)
        _, projected, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                               batch["attention_mask"])
        mask = step_mask(batch["lengths"], projected.shape[1])
        z = batch["encoded"] @ weight.T + bias
        expected = aw_cka(projected, z, zeroed["attention"], mask, estimator=estimator).mean()
        real = mask[..., None].float()
        for extra in ({}, {"gram": (z * real) @ (z * real).mT}):
            terms = distillation_terms(student, {**zeroed, **extra}, METHODS["pdist"], teacher, 1.0, 1.0)
            torch.testing.assert_close(terms["cka"], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_a_gram_in_the_batch_is_the_teacher_side(setup, estimator):
    """With a cached Gram in the batch, CKA is taken against that Gram, not against the teacher's
    projector applied to the encoder output: the Gram of other features (random, unrelated to the
    encoder output) gives the reference CKA against those features."""
    student, batch, weight, bias, _ = setup
    teacher = Teacher.of(weight, bias, 2.0, estimator)
    with torch.no_grad():
        _, projected, _ = forward_from_encoder(student, batch["encoded"], batch["lengths"], batch["input_ids"],
                                               batch["attention_mask"])
    mask = step_mask(batch["lengths"], projected.shape[1])
    real = mask[..., None].float()
    other = torch.randn(*projected.shape[:2], weight.shape[0], generator=torch.Generator().manual_seed(3))
    own = batch["encoded"] @ weight.T + bias
    with torch.no_grad():
        for method in ("pdist", "cka"):
            weights = batch["attention"] if METHODS[method].projector == "aw_cka" else mask.float()
            expected = aw_cka(projected, other, weights, mask, estimator=estimator).mean()
            against_own = aw_cka(projected, own, weights, mask, estimator=estimator).mean()
            assert abs(expected - against_own) > 1e-2  # the two teacher sides are told apart
            terms = distillation_terms(student, {**batch, "gram": (other * real) @ (other * real).mT},
                                       METHODS[method], teacher, 1.0, 1.0)
            torch.testing.assert_close(terms["cka"], expected, rtol=0, atol=1e-4)
