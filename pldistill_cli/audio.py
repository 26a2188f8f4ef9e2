"""Audio I/O and conditioning: any soundfile format, any rate, any channels -> mono float32 at 16 kHz.
(What a file holds is read and checked by inputs.audio_samples, which needs no torch: the CLI checks
predict's inputs with it before a model loads.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .files import atomic_path
from .inputs import MIN_SECONDS, SILENCE_PEAK, BadAudio, audio_problem, audio_samples  # noqa: F401 (shared names)


def read_audio(path: Path | str, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform at `sample_rate` (channels averaged); raises BadAudio for corrupt,
    empty, silent or non-finite audio."""
    wave, rate = audio_samples(path)
    if rate != sample_rate:
        wave = AF.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


def trim_silence(wave: np.ndarray, sample_rate: int, top_db: float, frame_s: float = 0.025) -> np.ndarray:
    """Cut leading and trailing frames whose RMS is more than `top_db` below the loudest frame."""
    frame = max(1, int(frame_s * sample_rate))
    n = len(wave) // frame
    if n < 2:
        return wave
    rms = np.sqrt(np.mean(wave[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-20)
    level = 20 * np.log10(rms / rms.max())
    loud = np.flatnonzero(level > -top_db)
    return wave[loud[0] * frame : (loud[-1] + 1) * frame]


def normalize_loudness(wave: np.ndarray, target_dbfs: float, peak_dbfs: float = -1.0) -> np.ndarray:
    """Scale to an RMS level of `target_dbfs`, then lower it if the peak would exceed `peak_dbfs`."""
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    gain = 10 ** (target_dbfs / 20) / max(rms, 1e-12)
    gain = min(gain, 10 ** (peak_dbfs / 20) / max(float(np.abs(wave).max()), 1e-12))
    return (wave * gain).astype(np.float32)


def write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """PCM16 wav, written atomically."""
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
