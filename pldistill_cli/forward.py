"""Inputs and forward passes shared by every stage: audio features, the encoder, the
LLM on top of (cached) encoder output, attention capture at one layer, and label scoring. Each
reaches the model's insides through its family (families.family_of), so every family runs the
same passes."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from .errors import PldistillError
from .families import family_of
from .losses import topk_logprobs
from .prompt import PromptLayout

# The LLM's KV-cache keyword and output field: `past_key_values` up to transformers 5.23 (the GPU
# image has 5.17), `cache` from 5.24 (which accepts `past_key_values` until 5.40, deprecated).
CACHE = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def audio_features(processor, waves: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Encoder input features padded to the encoder window, and their frame mask (clips beyond it are cut)."""
    return family_of(processor, "processor").audio_features(processor, waves)


def audio_steps(feature_mask: Tensor, processor) -> Tensor:
    """Number T of audio tokens per clip, as the family of the processor that made the features encodes them."""
    return family_of(processor, "processor").audio_steps(feature_mask)


def encode_audio(model, features: Tensor, feature_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder output X [B, T_max, D_enc] and lengths T [B], masked exactly as the model's family masks it."""
    return family_of(model).encode(model, features, feature_mask)


def step_mask(lengths: Tensor, steps: int) -> Tensor:
    return torch.arange(steps, device=lengths.device)[None] < lengths[:, None]


def forward_from_encoder(
    model,
    encoded: Tensor,
    lengths: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits: bool = True,
    **llm_kwargs,
) -> tuple[Tensor, Tensor, object]:
    """Logits [B, S, V] (or, with logits=False, the LLM's last hidden states [B, S, D]), projector
    output [B, T_max, D_llm] and the KV cache, from encoder output. Equals the model's own forward
    on the audio (tested); works with left or right padding."""
    family = family_of(model)
    projected = family.project(model, encoded)
    llm = family.llm(model)
    embeds = llm.get_input_embeddings()(input_ids)
    audio_slots = input_ids == family.audio_token_id(model.config)
    audio = projected[step_mask(lengths, projected.shape[1])]
    if audio.shape[0] != int(audio_slots.sum()):
        raise PldistillError(f"prompt has {int(audio_slots.sum())} audio slots for {audio.shape[0]} audio steps")
    embeds = embeds.masked_scatter(audio_slots[..., None], audio.to(embeds.dtype))
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, **llm_kwargs)
    hidden = out.last_hidden_state
    return family.head(model)(hidden) if logits else hidden, projected, getattr(out, CACHE)


@contextmanager
def capture_audio_attention(
    model, layer: int | str, query_mask: Tensor, audio_mask: Tensor,
    key_mask: Tensor
) -> Iterator[dict]:
    """While active, the next forward pass stores in result["weights"] the attention [B, S] of the
    given LLM layer (or, with "mean", the mean over every layer) from the query positions (query_mask)
    onto the audio keys (audio_mask): mean over heads and query positions, renormalised to sum 1 over
    the audio keys. key_mask is the attention mask (False = padding).

    Only those layers' query rows are recomputed from their inputs (q, k after rotary embedding), so no
    layer's full attention matrix is materialised and the model keeps its fast attention kernel."""
    family = family_of(model)
    layers = family.attention_layers(model)
    if layer != "mean" and not -len(layers) <= layer < len(layers):
        raise PldistillError(f"params.yaml: cache.attention_layer {layer} is outside the teacher's {len(layers)} LLM layers")
    chosen = layers if layer == "mean" else [layers[layer]]
    captured: list[Tensor] = []
    result: dict = {}

    def hook(module, args, kwargs, output):
        q, k, scaling = family.queries_keys(module, args, kwargs)
        s = q.shape[2]
        n_query = int(query_mask.sum(-1).max())
        # Gather each clip's query rows (padded to n_query) so only [B, H, n_query, S] scores exist.
        order = torch.sort(query_mask.long(), dim=-1, descending=True, stable=True).indices[:, :n_query]
        rows = torch.gather(q, 2, order[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        scores = (rows.float() @ k.float().transpose(-1, -2)) * scaling
        keys = torch.arange(s, device=q.device)
        allowed = (keys[None, None, :] <= order[:, :, None]) & key_mask.bool()[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1)
        row_valid = torch.gather(query_mask, 1, order).float()  # [B, n_query]
        mean = (probs.mean(1) * row_valid[..., None]).sum(1) / row_valid.sum(1, keepdim=True).clamp(min=1)
        mean = mean * audio_mask
        captured.append(mean / mean.sum(-1, keepdim=True).clamp(min=1e-12))
        result["weights"] = torch.stack(captured).mean(0)  # each layer's weights sum to 1: so does their mean

    handles = [attention.register_forward_hook(hook, with_kwargs=True) for attention in chosen]
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()


def forward_with_audio_attention(model, prompt: PromptLayout, encoded: Tensor, lengths: Tensor, input_ids: Tensor,
                                 attention_mask: Tensor, layer: int | str, logits: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Logits (or last hidden states) of a right-padded batch, and each clip's attention weights over
    its T audio steps: from the prompt's text queries after the audio (before any answer), at LLM `layer`."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    prompt_len = torch.tensor([len(prompt.prompt_ids(int(t))) for t in lengths], device=input_ids.device)
    audio_mask = input_ids == prompt.audio_token_id
    query_mask = (pos >= len(prompt.prefix) + lengths[:, None]) & (pos < prompt_len[:, None])
    with capture_audio_attention(model, layer, query_mask, audio_mask, attention_mask) as captured:
        out, _, _ = forward_from_encoder(model, encoded, lengths, input_ids, attention_mask, logits)
    return out, [captured["weights"][i][audio_mask[i]].float() for i in range(len(lengths))]


@torch.no_grad()
def score_labels(
    model, prompt: PromptLayout, encoded: Tensor, lengths: Tensor
) -> Tensor:
    """log P(answer = label | audio, prompt) for every label, [B, n_labels].

    Each answer's score is the summed log-probability of its label tokens and the end-of-turn
    token (no length normalisation: with the end-of-turn token included, the scores are the
    log-probabilities of complete answers). One shared prompt pass per clip (left-padded batch,
    KV cache), then all candidates in one pass over the repeated cache."""
    device = encoded.device
    prompts = [prompt.prompt_ids(int(t)) for t in lengths]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), prompt.pad_id, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    logits, _, cache = forward_from_encoder(model, encoded, lengths, ids, mask, use_cache=True)
    first = logits[:, -1].float().log_softmax(-1)  # predicts each answer's first token

    n = len(prompt.answers)
    answer_width = max(map(len, prompt.answers))
    cand = torch.full((n, answer_width), prompt.pad_id, device=device)
    cand_mask = torch.zeros((n, answer_width), device=device)
    for j, a in enumerate(prompt.answers):
        cand[j, : len(a)] = torch.tensor(a, device=device)
        cand_mask[j, : len(a)] = 1
    b = len(prompts)
    cache.batch_repeat_interleave(n)
    cand_ids = cand.repeat(b, 1)
    full_mask = torch.cat([mask.repeat_interleave(n, 0), torch.ones_like(cand_ids)], dim=1)
    positions = mask.sum(-1).repeat_interleave(n)[:, None] + torch.arange(answer_width, device=device)[None]
    family = family_of(model)
    out = family.llm(model)(
        input_ids=cand_ids, attention_mask=full_mask, position_ids=positions, use_cache=True, **{CACHE: cache}
    )
    logp = family.head(model)(out.last_hidden_state).float().log_softmax(-1)  # [b*n, W, V]
    # token t of the answer is predicted at step t-1 of the candidate pass (step -1 = the prompt pass)
    first_lp = first.repeat_interleave(n, 0).gather(1, cand_ids[:, :1])[:, 0]
    rest = logp[:, :-1].gather(2, cand_ids[:, 1:, None])[..., 0] * cand_mask.repeat(b, 1)[:, 1:]
    return (first_lp + rest.sum(-1)).view(b, n)


def topk_from_hidden(head: torch.nn.Module, hidden: torch.Tensor, k: int, temperature: float,
                     positions: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_logprobs(head(hidden)), computed `positions` rows at a time: the dense logits of a whole
    batch (B x S x 156,032 for Qwen2-Audio) never exist at once."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunks = [topk_logprobs(head(flat[i : i + positions]), k, temperature) for i in range(0, len(flat), positions)]
    shape = (*hidden.shape[:-1], k)
    return torch.cat([c[0] for c in chunks]).view(shape), torch.cat([c[1] for c in chunks]).view(shape)
