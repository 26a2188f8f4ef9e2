"""Scoring a manifest split from audio: label ranking or greedy generation parsed to a label, with
the encoder and LLM timed apart (train-teacher's validation, evaluate)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .data import AudioClips, AudioCollate, length_sorted_batches
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
    """Predict the clips of `rows` from their audio, by ranking the label words (`rank`) or by greedy
    generation parsed to a label (`generate`); also times the encoder and the LLM part."""
    model.eval()
    loader = DataLoader(AudioClips(rows, processor.feature_extractor.sampling_rate), batch_sampler=length_sorted_batches(rows["duration"], batch_size),
                        collate_fn=AudioCollate(processor))
    scores = np.zeros((len(rows), len(prompt.labels)), dtype=np.float32)
    answers = [""] * len(rows)
    timing = {"encoder": 0.0, "llm": 0.0}
    with progress(description, len(rows)) as bar:
        for batch in loader:
            start = time.perf_counter()
            with autocast(device):
                encoded, lengths = encode_audio(model, batch.features.to(device), batch.feature_mask.to(device))
                _sync(device)
                middle = time.perf_counter()
                if scoring == "rank":
                    scores[batch.rows] = score_labels(model, prompt, encoded, lengths).float().cpu().numpy()
                else:
                    for i, row in enumerate(batch.rows):
                        answers[row] = generate_answer(model, prompt, encoded[i : i + 1], lengths[i : i + 1],
                                                       processor.tokenizer, max_new_tokens)
            _sync(device)
            timing["encoder"] += middle - start
            timing["llm"] += time.perf_counter() - middle
            bar.advance(len(batch.rows))
    if scoring == "rank":
        predictions = [prompt.labels[j] for j in scores.argmax(1)]
    else:
        predictions = [parse_answer(a, prompt.labels) for a in answers]
    n = max(len(rows), 1)
    return Scored(predictions, scores if scoring == "rank" else None, answers if scoring != "rank" else None,
                  1000 * timing["encoder"] / n, 1000 * timing["llm"] / n)


def generate_answer(model, prompt: PromptLayout, encoded: torch.Tensor, lengths: torch.Tensor, tokenizer,
                    max_new_tokens: int) -> str:
    """Greedy decoding after the prompt (one clip), until the end of turn."""
    ids = torch.tensor([prompt.prompt_ids(int(lengths[0]))], device=encoded.device)
    mask = torch.ones_like(ids)
    eot = prompt.answers[0][-1]
    logits, _, cache = forward_from_encoder(model, encoded, lengths, ids, mask, use_cache=True)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == eot:
            break
        out.append(token)
        step = torch.tensor([[token]], device=encoded.device)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        hidden = model.model.language_model(input_ids=step, attention_mask=mask, use_cache=True, **{CACHE: cache},
                                            position_ids=torch.tensor([[mask.shape[1] - 1]], device=encoded.device))
        logits, cache = model.lm_head(hidden.last_hidden_state), getattr(hidden, CACHE)
    return tokenizer.decode(out, skip_special_tokens=True)
