"""cache-teacher: the teacher's distillation targets, computed once per fold and stored as Parquet
(the format, its meta and the reader live in cache.py).

The shared encoder's output X of each clip goes to the corpus's encoder store, filled clip by clip
as folds need it (audio is read only for clips the store lacks). Per utterance of the fold's train
and validation splits (never test), the fold's cache holds:
  attention       w [T]: teacher LLM attention at `attention_layer` from the text queries after the
                  audio (prompt, before the answer) onto the audio keys, mean over heads and queries
  effective_steps 1 / sum(w^2)
  topk_ids/...    the teacher's top-k log-probabilities at temperature `temperature` at every LDist
                  position (every next-token prediction of the sequence: audio and text positions of
                  the prompt, and the answer), [S - 1, k]; the rest of the mass is one tail bucket
  input_ids       the token ids the teacher read, checked against the prompt when read
With several processes (torchrun / accelerate launch) each writes its own parts of the same folder;
an interrupted run resumes from the parts already written (data/work/).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from .audio import read_audio
from .cache import (CACHE_SCHEMA, GRAM_SCHEMA, META_FILE, PROJECTOR_FILE, CacheMeta, EncoderRecord, EncoderStore,
                    encoder_fingerprint, expected_meta, ids_in, write_part)
from .config import Params, fingerprint, params_file, preprocessing
from .data import length_sorted_batches, text_batch
from .errors import PldistillError
from .families import family_of
from .files import replace_folder
from .forward import audio_features, encode_audio, forward_with_audio_attention, topk_from_hidden
from .inputs import check_cache_settings
from .layout import Layout
from .manifest import manifest_labels, read_manifest, split_of
from .models import bf16_device, load_encoder, load_model, weights_dtype
from .training import autocast, resolve_device, start_processes
from .ui import console, progress


def pad_steps(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, D] tensors -> right-padded [B, T_max, D] and lengths [B]."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out, lengths


class _ClipsToEncode(Dataset):
    """(row index, waveform or None): audio is read only for clips the encoder store lacks."""

    def __init__(self, rows: pd.DataFrame, store: EncoderStore, sample_rate: int):
        self.rows, self.store, self.sample_rate = rows, store, sample_rate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows.iloc[i]
        return i, None if row["id"] in self.store else read_audio(row["audio_path"], self.sample_rate)


@torch.no_grad()
def build_cache(dataset: str, fold: int, params: Params, layout: Layout = Layout()) -> Path:
    p = params.cache
    teacher_dir = layout.teacher(dataset, fold)
    check_cache_settings(teacher_dir, p.top_k, p.attention_layer, params_file(params))  # nothing written yet
    labels = manifest_labels(layout.manifest(dataset))
    device = resolve_device(p.device)
    processes = start_processes(device, params.world_size)
    rank = processes.process_index
    model, processor = load_model(teacher_dir, device, dtype=weights_dtype(params.model.dtype, device, frozen=True))
    family = family_of(model)
    prompt = family.prompt(processor, labels)
    manifest = read_manifest(layout.manifest(dataset))
    manifest["split"] = split_of(manifest, fold)
    rows = manifest[manifest["split"] != "test"].reset_index(drop=True)
    encoder_hash = encoder_fingerprint(load_encoder(teacher_dir)[1])  # the stored weights, not this dtype's copy
    precision = "bf16" if bf16_device(device) or model.dtype == torch.bfloat16 else "fp32"
    key = fingerprint({"encoder": encoder_hash, "preprocess": preprocessing(params),
                       "window": processor.feature_extractor.chunk_length, "precision": precision})
    store = EncoderStore(layout.encoded(dataset, key), family.projector(model).in_features)
    meta = dataclasses.replace(expected_meta(teacher_dir, prompt, params), ids=fingerprint(sorted(rows["id"])),
                               encoder=EncoderRecord(encoder_hash, str(store.folder), precision))

    work = layout.work(dataset, fold, "cache-teacher")
    if processes.is_main_process:
        if (work / META_FILE).exists() and CacheMeta.read(work) != meta:
            shutil.rmtree(work)  # a different teacher, prompt or setting: the partial cache is stale
        work.mkdir(parents=True, exist_ok=True)
        meta.write(work)
    processes.wait_for_everyone()
    done = set(ids_in(work))
    todo = rows[~rows["id"].isin(done)].reset_index(drop=True)
    # Clips of similar length share a batch; each process takes every num_processes-th batch.
    mine = length_sorted_batches(todo["duration"], p.batch_size)[rank :: processes.num_processes]
    loader = DataLoader(_ClipsToEncode(todo, store, params.preprocess.sample_rate), batch_sampler=mine, collate_fn=list)
    seconds = 0.0
    with progress(f"cache teacher {dataset} fold {fold}", len(rows)) as bar:
        bar.update(completed=len(done))
        began = time.perf_counter()
        for items in loader:
            batch = todo.iloc[[i for i, _ in items]]
            new = [(i, w) for i, w in items if w is not None]
            encoded_new = {}
            if new:
                features, mask = audio_features(processor, [w for _, w in new])
                with autocast(device):
                    x, lengths = encode_audio(model, features.to(device), mask.to(device))
                new_ids = [todo.at[i, "id"] for i, _ in new]
                store.add(rank, new_ids, x, lengths)
                encoded_new = {clip: x[j, : int(lengths[j])].float().cpu() for j, clip in enumerate(new_ids)}
            encoded, lengths = pad_steps([encoded_new[c] if c in encoded_new else store.get(c) for c in batch["id"]])
            encoded, lengths = encoded.to(device), lengths.to(device)
            text = text_batch(prompt, lengths.tolist(), batch["label"].tolist()).to(device)
            with autocast(device):
                hidden, weights = forward_with_audio_attention(model, prompt, encoded.to(model.dtype), lengths,
                                                               text.input_ids, text.attention_mask, p.attention_layer,
                                                               logits=False)
                top_ids, top_lp = topk_from_hidden(family.head(model), hidden[:, :-1], p.top_k, p.temperature)
            if p.projector_targets == "gram":
                z = family.project(model, encoded.to(model.dtype)).float()
                grams = z @ z.mT
            out = []
            for i, row in enumerate(batch.itertuples()):
                s, w = int(text.attention_mask[i].sum()), weights[i]
                out.append({
                    "id": row.id, "label": row.label, "split": row.split, "n_audio": int(lengths[i]),
                    "input_ids": text.input_ids[i, :s].int().cpu().numpy(),
                    "attention": w.cpu().numpy(),
                    "effective_steps": float(1.0 / w.square().sum()),
                    "topk_ids": top_ids[i, : s - 1].flatten().int().cpu().numpy(),
                    "topk_logprobs": top_lp[i, : s - 1].flatten().cpu().numpy(),
                })
                if p.projector_targets == "gram":
                    t = int(lengths[i])
                    out[-1]["gram"] = grams[i, :t, :t].flatten().cpu().numpy()
            # resumable: a re-run skips the ids already written
            write_part(work, rank, out, GRAM_SCHEMA if p.projector_targets == "gram" else CACHE_SCHEMA)
            seconds += float(batch["duration"].sum())
            bar.advance(len(out) * processes.num_processes)  # every process does a like share
    elapsed = max(time.perf_counter() - began, 1e-9)
    processes.wait_for_everyone()
    final = layout.cache(dataset, fold)
    if processes.is_main_process:
        ids = ids_in(work)
        if len(ids) != len(set(ids)) or set(ids) != set(rows["id"]):
            raise PldistillError(f"{work}: {len(ids)} rows for {len(rows)} utterances ({len(ids) - len(set(ids))} "
                                 "duplicated); delete the folder and re-run `pldistill cache-teacher`")
        projector = family.projector(model)
        save_file({"weight": projector.weight.float().cpu().contiguous(),
                   "bias": projector.bias.float().cpu().contiguous()}, str(work / PROJECTOR_FILE))
        final.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(work, final)
    processes.wait_for_everyone()
    clips = sum(map(len, mine))
    console.print(f"cache: {len(rows)} utterances -> {final}; this process cached {clips} at {clips / elapsed:.1f} "
                  f"clips/s ({seconds / elapsed:.0f} s of audio per s; {processes.num_processes} process(es))")
    return final
