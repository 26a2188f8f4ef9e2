"""Audio I/O and conditioning: any soundfile format, any rate, any channels -> mono float32 at 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .files import atomic_path

SILENCE_PEAK = 1e-4  # a clip whose peak stays below this (-80 dBFS) carries no speech


class BadAudio(ValueError):
    """One unusable audio file; the caller reports and skips it."""


def read_audio(path: Path | str, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform at `sample_rate` (channels averaged); raises BadAudio for corrupt,
    empty, silent or non-finite audio."""
    if not Path(path).is_file():
        raise BadAudio("file not found")
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
