"""Audio I/O and conditioning: any soundfile format, any rate, any channels -> mono float32 at 16 kHz."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SILENCE_PEAK = 1e-4  # a clip whose peak stays below this (-80 dBFS) carries no speech


class BadAudio(ValueError):
    """One unusable audio file; the caller reports and skips it."""


def read_audio(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 waveform at `sample_rate`; raises BadAudio for corrupt, empty, silent or non-finite audio."""
    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise BadAudio(f"unreadable ({str(exc).splitlines()[0]})") from None
    if wave.size == 0:
        raise BadAudio("empty")
    if not np.isfinite(wave).all():
        raise BadAudio("non-finite samples")
    wave = wave.mean(axis=1)
    if np.abs(wave).max() < SILENCE_PEAK:
        raise BadAudio("silent")
    if rate != sample_rate:
        wave = AF.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


def write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """PCM16 wav, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def audio_duration(path: Path) -> float:
    return sf.info(str(path)).duration
