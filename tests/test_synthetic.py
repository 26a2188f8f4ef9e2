"""Tests for the built-in synthetic emotional-speech corpus (espeak-ng via the espeakng-loader wheel)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pldistill_cli import synthesis as syn
from pldistill_cli.synthesis import (
    EMOTIONS,
    SyntheticSettings,
    SyntheticUtterance,
    generate_corpus,
    plan_corpus,
    synthesize,
)

FAST = ("Angry", "Happy", "Surprise", "Fear")
SLOW = ("Sad", "Calm")


@pytest.fixture(scope="module")
def default_plan() -> list[SyntheticUtterance]:
    return plan_corpus(SyntheticSettings())


def _by_label(plan, field):
    out = {}
    for u in plan:
        out.setdefault(u.label, []).append(getattr(u, field))
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- plan


def test_emotion_labels_are_the_ravdess_eight():
    assert EMOTIONS == ("Neutral", "Calm", "Happy", "Sad", "Angry", "Fear", "Disgust", "Surprise")
    assert len(syn.SENTENCES) >= 8
    assert len(set(syn.VOICES)) == len(syn.VOICES) >= 10


def test_plan_counts_and_balance(default_plan):
    plan = default_plan
    settings = SyntheticSettings()
    assert (settings.seed, settings.n_speakers, settings.n_sentences, settings.max_seconds) == (42, 10, 6, 4.0)
    assert len(plan) == 10 * 8 * 6 == 480

    speakers = sorted({u.speaker for u in plan})
    assert speakers == [f"spk{i:02d}" for i in range(1, 11)]
    assert {u.label for u in plan} == set(EMOTIONS)

    # Every speaker has every emotion equally often.
    per_speaker_emotion = Counter((u.speaker, u.label) for u in plan)
    assert len(per_speaker_emotion) == 10 * 8
    assert set(per_speaker_emotion.values()) == {6}

    # Every sentence is equally frequent within each emotion (and within each speaker x emotion).
    for label in EMOTIONS:
        counts = Counter(u.sentence for u in plan if u.label == label)
        assert len(counts) == 6 and set(counts.values()) == {10}
    assert set(Counter((u.speaker, u.label, u.sentence) for u in plan).values()) == {1}

    # One voice per speaker, distinct across speakers, and every voice appears with every emotion.
    voice_of = {}
    for u in plan:
        voice_of.setdefault(u.speaker, set()).add(u.voice)
    assert all(len(v) == 1 for v in voice_of.values())
    assert len({next(iter(v)) for v in voice_of.values()}) == 10
    for voice in {u.voice for u in plan}:
        assert {u.label for u in plan if u.voice == voice} == set(EMOTIONS)

    # Ids: unique, stable format, consistent with the fields.
    ids = [u.utt_id for u in plan]
    assert len(set(ids)) == len(ids)
    for u in plan:
        assert re.fullmatch(r"synthetic-spk\d\d-[a-z]+-s\d+", u.utt_id)
        assert u.utt_id == f"synthetic-{u.speaker}-{u.label.lower()}-s{u.sentence_index}"
        assert u.sentence == syn.SENTENCES[u.sentence_index - 1]
        assert u.text.rstrip(".!?") == u.sentence.rstrip(".!?") and u.text[-1] in ".!?"
        assert 0 <= u.pitch <= 100 and 0 <= u.pitch_range <= 100
        assert 80 <= u.rate <= 450 and 0 < u.volume <= 200 and u.word_gap >= 0


def test_plan_deterministic_and_seed_dependent(default_plan):
    again = plan_corpus(SyntheticSettings())
    assert again == default_plan

    other = plan_corpus(SyntheticSettings(seed=7))
    assert [u.utt_id for u in other] == [u.utt_id for u in default_plan]
    assert other != default_plan
    changed = sum(a != b for a, b in zip(other, default_plan))
    assert changed > 0.9 * len(default_plan)


def test_the_default_corpus_and_the_teachers_pool_are_the_ones_the_committed_outputs_came_from(default_plan):
    """Every drawn setting of the default corpus and of pretrain-teacher's pool (84 voices x 3 sentences), pinned:
    the committed metrics and report (the corpus) and data/teacher-init (the pool) were made from exactly these
    plans, so a change to the generator (a draw added or reordered) shows here, not as a silent change of data."""
    def digest(plan) -> str:
        return hashlib.sha256(json.dumps([dataclasses.asdict(u) for u in plan], sort_keys=True).encode()).hexdigest()[:16]

    assert digest(default_plan) == "1f05eb69e6e9c4a9"
    assert digest(syn.plan_emotion_pool(42, 84, 3)) == "9b5aa99b08e4220d"


def test_utterance_draws_do_not_depend_on_corpus_size(default_plan):
    small = plan_corpus(SyntheticSettings(n_speakers=8, n_sentences=2))
    assert len(small) == 8 * 8 * 2
    by_id = {u.utt_id: u for u in default_plan}
    for u in small:
        assert by_id[u.utt_id] == u


def test_settings_are_validated():
    with pytest.raises(ValueError):
        SyntheticSettings(n_speakers=0)
    with pytest.raises(ValueError):
        SyntheticSettings(n_speakers=len(syn.VOICES) + 1)
    with pytest.raises(ValueError):
        SyntheticSettings(n_sentences=len(syn.SENTENCES) + 1)
    with pytest.raises(ValueError):
        SyntheticSettings(max_seconds=0.5)
    assert len(plan_corpus(SyntheticSettings(n_speakers=16, n_sentences=10))) == 16 * 8 * 10


def test_prosody_differs_by_emotion_but_overlaps(default_plan):
    rate = _by_label(default_plan, "rate")
    pitch = _by_label(default_plan, "pitch")
    volume = _by_label(default_plan, "volume")
    prange = _by_label(default_plan, "pitch_range")
    mean = lambda d, k: float(d[k].mean())  # noqa: E731

    # Different on average ...
    for fast, slow in itertools.product(FAST, SLOW):
        assert mean(rate, fast) > mean(rate, slow), (fast, slow)
    assert mean(volume, "Angry") > mean(volume, "Neutral") > mean(volume, "Sad")
    assert mean(pitch, "Surprise") > mean(pitch, "Neutral") > mean(pitch, "Sad")
    assert mean(pitch, "Fear") > mean(pitch, "Calm")
    assert mean(prange, "Surprise") > mean(prange, "Calm") and mean(prange, "Happy") > mean(prange, "Sad")

    # ... but overlapping: no single cue separates two emotions cleanly.
    def overlap(d, a, b):
        return d[a].max() >= d[b].min() and d[b].max() >= d[a].min()

    for a, b in itertools.combinations(EMOTIONS, 2):
        assert overlap(rate, a, b), ("rate", a, b)
    assert overlap(rate, "Sad", "Angry") and overlap(rate, "Calm", "Happy")
    assert overlap(pitch, "Neutral", "Calm") and overlap(volume, "Neutral", "Happy")

    # Spreads are real: each emotion's rate has a non-trivial standard deviation.
    for label in EMOTIONS:
        assert rate[label].std() > 5.0

    # Loudness is confounded with speaker-level gain, so it is no clean cue either.
    gain = {}
    for u in default_plan:
        gain.setdefault(u.speaker, []).append(u.gain_db)
    speaker_means = [float(np.mean(v)) for v in gain.values()]
    assert max(speaker_means) - min(speaker_means) > 3.0


# ------------------------------------------------------------------------------------------- audio


def test_synthesize_gives_finite_nonsilent_bounded_audio(default_plan):
    # One utterance per emotion, from different speakers, including the slowest-rate one.
    picks = [next(u for u in default_plan if u.label == e and u.speaker == f"spk{i + 1:02d}")
             for i, e in enumerate(EMOTIONS)]
    picks.append(min(default_plan, key=lambda u: (u.rate, -u.word_gap)))
    for utt in picks:
        x, sr = synthesize(utt)
        assert sr == 22050
        assert x.dtype == np.float32 and x.ndim == 1
        assert np.all(np.isfinite(x))
        assert float(np.max(np.abs(x))) <= 1.0
        assert float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) > 1e-3
        assert 0.5 * sr < x.size < utt.max_seconds * sr


def test_synthesize_is_deterministic_and_order_independent(default_plan):
    a, b = default_plan[3], default_plan[-1]
    x1, _ = synthesize(a)
    synthesize(b)  # espeak keeps C-level state between calls; it must not leak into the next one
    x2, _ = synthesize(a)
    x3, _ = synthesize(a)
    assert np.array_equal(x1, x2) and np.array_equal(x2, x3)
    assert x1.any()


def test_synthesize_respects_max_seconds(default_plan):
    slow = min(default_plan, key=lambda u: u.rate)
    short = dataclasses.replace(slow, max_seconds=1.5)
    x, sr = synthesize(short)
    assert x.size < 1.5 * sr
    assert np.all(np.isfinite(x)) and np.any(x != 0)


def test_missing_library_gives_one_line_install_hint(monkeypatch, default_plan):
    monkeypatch.setattr(syn, "_ENGINE", None)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # makes `import espeakng_loader` fail
    with pytest.raises(RuntimeError) as info:
        synthesize(default_plan[0])
    message = str(info.value)
    assert "pip install espeakng-loader" in message and "\n" not in message


# ------------------------------------------------------------------------------------------ corpus


def test_generate_corpus_writes_wavs_and_resumes(tmp_path: Path):
    settings = SyntheticSettings(n_speakers=8, n_sentences=1)
    calls = []
    plan = generate_corpus(tmp_path, settings, on_progress=lambda: calls.append(1))
    assert plan == plan_corpus(settings)
    assert len(calls) == len(plan) == 64

    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == sorted(f"{u.utt_id}.wav" for u in plan)  # no temp files left
    for u in plan[:: 9]:
        path = tmp_path / f"{u.utt_id}.wav"
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
        assert info.duration < settings.max_seconds
        y, sr = sf.read(str(path), dtype="float32")
        x, _ = synthesize(u)
        assert sr == 22050 and np.array_equal(x, y)  # PCM16 round trip is lossless

    # Backdate every file, then rerun: nothing may be rewritten.
    old = 1_000_000_000
    for p in files:
        os.utime(p, ns=(old * 10**9, old * 10**9))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    calls.clear()
    generate_corpus(tmp_path, settings, on_progress=lambda: calls.append(1))
    assert len(calls) == 64
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == {k: v[0] for k, v in before.items()}

    # A missing and a damaged file are re-rendered, bit-identically; the rest stay untouched.
    gone, broken = files[0], files[1]
    gone.unlink()
    broken.write_bytes(before[broken.name][1][:1000])
    generate_corpus(tmp_path, settings)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    for name, (mtime, blob) in after.items():
        assert blob == before[name][1], name
        if name in (gone.name, broken.name):
            assert mtime != old * 10**9
        else:
            assert mtime == old * 10**9

    # Different parameters for the same id (another seed) are detected and re-rendered.
    other = SyntheticSettings(seed=settings.seed + 1, n_speakers=8, n_sentences=1)
    generate_corpus(tmp_path, other)
    assert all(p.stat().st_mtime_ns != old * 10**9 for p in tmp_path.iterdir())


def test_the_planned_prosody_reaches_the_audio(default_plan):
    """Each prosody setting moves what is measured in the rendered audio the way the plan says: pitch the
    F0, rate the duration, volume the level, pitch range the F0 spread, word gaps the pauses, breathiness
    the brightness and zero crossings (noise) but not the level."""
    from pldistill_cli.references import PROSODY_FEATURES, prosody_features

    base = dataclasses.replace(default_plan[0], breathiness=0.0, tilt=0.0, ending=".", lead_silence=0.1,
                               tail_silence=0.1, gain_db=0.0)

    def measured(**change):
        wave, rate = synthesize(dataclasses.replace(base, **change))
        return dict(zip(PROSODY_FEATURES, prosody_features(wave.astype(np.float64), rate)))

    low, high = measured(pitch=25), measured(pitch=75)
    assert high["f0_mean"] > 1.15 * low["f0_mean"]
    slow, fast = measured(rate=120), measured(rate=240)
    assert slow["duration_s"] > 1.4 * fast["duration_s"]
    quiet, loud = measured(volume=60), measured(volume=160)
    assert loud["rms_mean_db"] > quiet["rms_mean_db"] + 4
    flat, lively = measured(pitch_range=5), measured(pitch_range=95)
    assert lively["f0_range"] > flat["f0_range"]
    tight, gappy = measured(word_gap=0), measured(word_gap=6)
    assert gappy["duration_s"] > tight["duration_s"] + 0.15 and gappy["active_fraction"] < tight["active_fraction"]
    clear, breathy = measured(), measured(breathiness=0.36)
    assert breathy["spectral_centroid_mean"] > clear["spectral_centroid_mean"] + 150
    assert breathy["zcr_mean"] > 1.2 * clear["zcr_mean"]
    assert breathy["rms_mean_db"] == pytest.approx(clear["rms_mean_db"], abs=0.5)
