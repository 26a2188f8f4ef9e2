"""How long preprocessing takes per hour of audio: a RAVDESS-shaped tree of 48 kHz clips, conditioned
with the configured workers. Usage: python scripts/bench_preprocess.py [n_clips] [workers]"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from pldistill_cli.config import Params, PreprocessParams
from pldistill_cli.layout import Layout
from pldistill_cli.preprocess import preprocess

n_clips = min(int(sys.argv[1]) if len(sys.argv) > 1 else 240, 768)  # unique RAVDESS names
workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
rng = np.random.default_rng(0)
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) / "RAVDESS"
    seconds = 0.0
    for i in range(n_clips):
        actor, emotion, statement, repetition = i % 24 + 1, i // 24 % 8 + 1, i // 192 % 2 + 1, i // 384 % 2 + 1
        length = rng.uniform(3.0, 4.5)
        t = np.arange(int(length * 48000)) / 48000
        wave = 0.2 * np.sin(2 * np.pi * 150 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))
        folder = root / f"Actor_{actor:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"03-01-{emotion:02d}-01-{statement:02d}-{repetition:02d}-{actor:02d}.wav", wave, 48000, subtype="PCM_16")
        seconds += length
    params = Params(preprocess=PreprocessParams(workers=workers))
    layout = Layout(data=Path(tmp) / "data")
    start = time.perf_counter()
    result = preprocess("ravdess", params, layout, root)
    first = time.perf_counter() - start
    start = time.perf_counter()
    preprocess("ravdess", params, layout, root)
    again = time.perf_counter() - start
hours = seconds / 3600
print(f"{result.n_utterances} clips, {seconds / 60:.1f} min of 48 kHz audio, {workers} workers: "
      f"{first:.1f} s ({first / hours:.1f} s per hour of audio); unchanged re-run {again:.1f} s")
