"""pretrain-encoder: the audio encoder that every teacher of a preset built from configs starts from.

Qwen2-Audio's encoder comes pretrained (Whisper's, then Qwen's audio pretraining). A preset's encoder is
random, and a random encoder trained on one fold's few hundred clips learns their voices rather than
their emotions (the embedded default's teacher: 5-fold mean test UA 0.30, below a 12-feature prosody
reference). So first it learns to hear prosody: it regresses the prosody settings (PROSODY_TARGETS) and
the final tune of emotion-free synthetic speech, in voices and sentences that no corpus fold uses,
through a linear head on pooled steps that is then thrown away. A tenth of the clips is held out; the
encoder kept is the epoch with the best mean held-out R^2, recorded per target in its metadata.
With model.preset hub the checkpoint's encoder is used and this stage only records that;
`pretrain_encoder.clips: 0` keeps the random encoder."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .config import Params, fingerprint
from .families import family_of
from .forward import audio_features, encode_audio, step_mask
from .layout import Layout
from .models import EncoderMeta, begin_pretraining, build_teacher, environment, get_preset, save_pretrained
from .synthesis import PROSODY_TARGETS, plan_pretraining, prosody_targets, render_features
from .training import LoopResult, LoopSettings, Run, TrainingStep, fit, resolve_device, seed_everything, \
    shuffled_batches
from .ui import console, progress


def pooled(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per clip: the mean, standard deviation and maximum of the encoder's steps and the mean of their
    last quarter (where the final tune is), over real steps only: [B, 4 D]."""
    mask = step_mask(lengths, hidden.shape[1]).unsqueeze(-1).to(hidden.dtype)
    n = mask.sum(1)
    mean = (hidden * mask).sum(1) / n
    sd = ((hidden - mean[:, None]).square() * mask).sum(1).div(n).sqrt()
    top = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
    steps = torch.arange(hidden.shape[1], device=hidden.device)[None, :, None]
    last = mask * (steps >= (lengths[:, None, None] * 3) // 4)
    return torch.cat([mean, sd, top, (hidden * last).sum(1) / last.sum(1)], -1)


def pretrain_encoder(params: Params, layout: Layout = Layout()) -> EncoderMeta:
    p, preset, device = params.pretrain_encoder, params.model.preset, resolve_device(params.pretrain_encoder.device)
    made_by, skipped = begin_pretraining(EncoderMeta, params, layout.encoder(), device)
    if skipped is not None:
        return skipped

    plan = plan_pretraining(params.seed, p.clips)
    model, processor = build_teacher(get_preset(preset), params.seed)
    with progress("synthesise pretraining speech", len(plan)) as bar:
        features, feature_mask, _ = render_features(plan, processor.feature_extractor.sampling_rate,
                                                    functools.partial(audio_features, processor), bar.advance)
    values, tunes = zip(*map(prosody_targets, plan))
    values = torch.tensor(values)
    held = max(1, len(plan) // 10)
    # targets standardised on the training clips: every target weighs the same in the loss
    scale = (values[held:].mean(0), values[held:].std(0).clamp(min=1e-6))
    targets, tunes = (values - scale[0]) / scale[1], torch.tensor(tunes)

    encoder = family_of(model).encoder(model).to(device)
    head = torch.nn.Linear(4 * encoder.config.d_model, len(PROSODY_TARGETS) + 3).to(device)

    def predict(rows: list[int]) -> torch.Tensor:
        hidden, lengths = encode_audio(model, features[rows].to(device), feature_mask[rows].to(device))
        return head(pooled(hidden, lengths))

    def terms(rows: list[int]) -> dict[str, torch.Tensor]:
        out = predict(rows)
        regression = torch.nn.functional.mse_loss(out[:, :-3], targets[rows].to(device))
        tune = torch.nn.functional.cross_entropy(out[:, -3:], tunes[rows].to(device))
        return {"loss": regression + tune, "regression": regression, "tune": tune}

    def held_out() -> dict[str, float]:
        """R^2 of each target on the held-out clips, and the share of their tunes named right."""
        with torch.no_grad():
            out = torch.cat([predict(list(range(i, min(i + 64, held)))) for i in range(0, held, 64)]).cpu()
        error = (out[:, :-3] - targets[:held]).square().mean(0)
        r2 = 1 - error / targets[:held].var(0, unbiased=False).clamp(min=1e-6)
        return {**dict(zip(PROSODY_TARGETS, r2.tolist())), "tune": float((out[:, -3:].argmax(1) == tunes[:held]).float().mean())}

    seed_everything(params.seed)
    train_rows = np.arange(held, len(plan))
    batches = lambda epoch: ([int(train_rows[i]) for i in b]
                             for b in shuffled_batches(len(train_rows), p.batch_size, params.seed + epoch))
    mean_r2 = lambda: float(np.mean([v for k, v in held_out().items() if k != "tune"]))

    def save(result: LoopResult, _refit: None, _write: bool) -> EncoderMeta:
        scores = {k: round(v, 4) for k, v in held_out().items()}  # of the kept (best) epoch
        meta = EncoderMeta(source="pretrained", versions=environment(device), clips=len(plan), held_out=scores,
                           best_epoch=result.best_epoch, history=tuple(result.history), **made_by)
        return save_pretrained(layout.encoder(), {k: v.cpu() for k, v in encoder.state_dict().items()}, meta)

    run = Run(TrainingStep({"encoder": encoder, "head": head}, terms), batches, -(-len(train_rows) // p.batch_size))
    meta = fit(run, mean_r2, LoopSettings.of(p), layout.work(None, None, "pretrain-encoder"), fingerprint(made_by),
               "pretrain encoder", save, score_name="held_out_r2")
    scores = meta.held_out
    console.print(f"encoder: pretrained on {len(plan) - held} clips; held-out R^2 "
                  + ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "tune")
                  + f"; final tune {scores['tune']:.0%} right (chance 33%)")
    return meta
