"""Scoring a manifest split from audio: label ranking or greedy generation parsed to a label, with
the encoder and LLM timed apart (train-teacher's validation, evaluate)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .data import Clips, length_sorted_batches
from .families import family_of
from .forward import CACHE, encode_audio, forward_from_encoder, score_labels
from .metrics import parse_answer
from .prompt import PromptLayout
from .training import autocast
from .ui import progress


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Scored:
    predictions: list[str]
    scores: np.ndarray | None  # label log-probabilities [N, n_labels] (ranking mode)
    answers: list[str] | None  # generated text (generation mode)
    encoder_ms: float  # mean per clip
    llm_ms: float


@torch.no_grad()
def predict_audio(model, processor, prompt: PromptLayout, rows: pd.DataFrame, batch_size: int, device: torch.device,
                  description: str = "score", scoring: str = "rank", max_new_tokens: int = 8) -> Scored:
    """Predict the clips of `rows` from their audio (see predict_clips)."""
    return predict_clips(model, processor.tokenizer, prompt, Clips(rows, processor), list(range(len(rows))),
                         batch_size, device, description, scoring, max_new_tokens)


@torch.no_grad()
def predict_clips(model, tokenizer, prompt: PromptLayout, clips: Clips, subset: list[int], batch_size: int,
                  device: torch.device, description: str = "score", scoring: str = "rank",
                  max_new_tokens: int = 8) -> Scored:
    """Predict the clips `subset` (row indices of `clips`, in that order) by ranking the label words
    (`rank`) or by greedy generation parsed to a label (`generate`); also times the encoder and the LLM."""
    model.eval()
    position = {row: k for k, row in enumerate(subset)}
    lengths = clips.rows["duration"].iloc[subset].to_numpy()
    loader = clips.loader([[subset[j] for j in b] for b in length_sorted_batches(lengths, batch_size)])
    scores = np.zeros((len(subset), len(prompt.labels)), dtype=np.float32)
    answers = [""] * len(subset)
    timing = {"encoder": 0.0, "llm": 0.0}
    with progress(description, len(subset)) as bar:
        for batch in loader:
            places = [position[r] for r in batch.rows]
            start = time.perf_counter()
            with autocast(device):
                encoded, steps = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
                _sync(device)
                middle = time.perf_counter()
                if scoring == "rank":
                    scores[places] = score_labels(model, prompt, encoded, steps).float().cpu().numpy()
                else:
                    for i, place in enumerate(places):
                        answers[place] = generate_answer(model, prompt, encoded[i : i + 1], steps[i : i + 1],
                                                         tokenizer, max_new_tokens)
            _sync(device)
            timing["encoder"] += middle - start
            timing["llm"] += time.perf_counter() - middle
            bar.advance(len(batch.rows))
    if scoring == "rank":
        predictions = [prompt.labels[j] for j in scores.argmax(1)]
    else:
        predictions = [parse_answer(a, prompt.labels) for a in answers]
    n = max(len(subset), 1)
    return Scored(predictions, scores if scoring == "rank" else None, answers if scoring != "rank" else None,
                  1000 * timing["encoder"] / n, 1000 * timing["llm"] / n)


def generate_answer(model, prompt: PromptLayout, encoded: torch.Tensor, lengths: torch.Tensor, tokenizer,
                    max_new_tokens: int) -> str:
    """Greedy decoding after the prompt (one clip), until the end of turn."""
    ids = torch.tensor([prompt.prompt_ids(int(lengths[0]))], device=encoded.device)
    mask = torch.ones_like(ids)
    eot = prompt.answers[0][-1]
    logits, _, cache = forward_from_encoder(model, encoded, lengths, ids, mask, use_cache=True)
    family = family_of(model)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == eot:
            break
        out.append(token)
        step = torch.tensor([[token]], device=encoded.device)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        hidden = family.llm(model)(input_ids=step, attention_mask=mask, use_cache=True, **{CACHE: cache},
                                   position_ids=torch.tensor([[mask.shape[1] - 1]], device=encoded.device))
        logits, cache = family.head(model)(hidden.last_hidden_state), getattr(hidden, CACHE)
    return tokenizer.decode(out, skip_special_tokens=True)
