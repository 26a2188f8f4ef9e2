"""Tests for pldistill_cli.references (synthetic audio only, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from pldistill_cli.references import (
    PROSODY_FEATURES,
    ReferenceResult,
    features_for_files,
    fit_and_score_references,
    prosody_features,
)

SR = 16000
IDX = {name: i for i, name in enumerate(PROSODY_FEATURES)}


def harmonic_tone(f0: float, dur: float = 1.0, amp: float = 0.3, n_harm: int = 5, sr: int = SR,
                  noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    t = np.arange(int(round(dur * sr))) / sr
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, n_harm + 1))
    x = amp * x / np.max(np.abs(x))
    if noise:
        x = x + noise * (rng or np.random.default_rng(0)).standard_normal(x.size)
    return x.astype(np.float32)


def accuracy(res: ReferenceResult) -> float:
    return float(np.mean(np.array(res.y_true) == np.array(res.y_pred)))


# ---------------------------------------------------------------- prosody_features


def test_feature_names_and_shape():
    assert len(PROSODY_FEATURES) == len(set(PROSODY_FEATURES)) >= 10
    for name in ("duration_s", "f0_mean", "voiced_fraction", "rms_mean_db", "syllable_rate"):
        assert name in PROSODY_FEATURES
    v = prosody_features(harmonic_tone(150), SR)
    assert v.dtype == np.float64 and v.shape == (len(PROSODY_FEATURES),)


@pytest.mark.parametrize("f0", [120.0, 200.0, 300.0])
def test_f0_of_harmonic_tone(f0):
    v = prosody_features(harmonic_tone(f0, dur=1.2), SR)
    assert v[IDX["f0_mean"]] == pytest.approx(f0, rel=0.05)
    assert v[IDX["voiced_fraction"]] > 0.9
    assert v[IDX["f0_range"]] < 0.5  # semitones: a steady tone has (almost) no range
    assert v[IDX["duration_s"]] == pytest.approx(1.2)


def test_f0_robust_to_mild_noise():
    v = prosody_features(harmonic_tone(200, noise=0.02), SR)
    assert v[IDX["f0_mean"]] == pytest.approx(200, rel=0.05)
    assert v[IDX["voiced_fraction"]] > 0.8


def test_pitch_glide_has_range():
    t = np.arange(SR) / SR
    f = 150 * 2 ** (t)  # one octave up over one second
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / SR)
    v = prosody_features(x, SR)
    assert 8 < v[IDX["f0_range"]] < 12  # p90-p10 of a 12-semitone linear glide ~ 9.6
    assert v[IDX["f0_std"]] > 2


def test_amplitude_scaling():
    x = harmonic_tone(200)
    a, b = prosody_features(x, SR), prosody_features(0.5 * x, SR)
    assert b[IDX["rms_mean_db"]] - a[IDX["rms_mean_db"]] == pytest.approx(-6.02, abs=0.2)
    assert b[IDX["f0_mean"]] == pytest.approx(a[IDX["f0_mean"]], rel=1e-3)
    assert b[IDX["duration_s"]] == a[IDX["duration_s"]]


def test_duration():
    for n in (8000, 16000, 40000, 12345):
        x = harmonic_tone(180, dur=n / SR)
        assert prosody_features(x, SR)[IDX["duration_s"]] == pytest.approx(n / SR)
    # duration follows the sample rate
    x8 = harmonic_tone(180, dur=1.5, sr=8000)
    v8 = prosody_features(x8, 8000)
    assert v8[IDX["duration_s"]] == pytest.approx(1.5)
    assert v8[IDX["f0_mean"]] == pytest.approx(180, rel=0.05)


@pytest.mark.parametrize("n", [0, 10, 400, 16000])
def test_silence_and_tiny_inputs_are_finite(n):
    v = prosody_features(np.zeros(n, dtype=np.float32), SR)
    assert v.shape == (len(PROSODY_FEATURES),)
    assert np.all(np.isfinite(v))
    assert v[IDX["voiced_fraction"]] == 0
    assert v[IDX["f0_mean"]] == 0
    assert v[IDX["duration_s"]] == pytest.approx(n / SR)


def test_noise_and_short_tone_are_finite():
    rng = np.random.default_rng(1)
    noise = prosody_features(0.1 * rng.standard_normal(SR), SR)
    assert np.all(np.isfinite(noise))
    assert noise[IDX["voiced_fraction"]] < 0.2
    short = prosody_features(harmonic_tone(200, dur=0.02), SR)  # shorter than one pitch frame
    assert np.all(np.isfinite(short))
    tiny = prosody_features(np.full(2000, 1e-12), SR)  # DC / near-silence
    assert np.all(np.isfinite(tiny))


def test_syllable_rate_counts_energy_bursts():
    t = np.arange(2 * SR) / SR
    env = np.clip(np.sin(2 * np.pi * 2 * t), 0, None) ** 2  # 4 bursts in 2 s
    v = prosody_features(harmonic_tone(150, dur=2.0) * env, SR)
    active_s = v[IDX["active_fraction"]] * 2.0
    assert round(v[IDX["syllable_rate"]] * active_s) == 4
    steady = prosody_features(harmonic_tone(150, dur=2.0), SR)
    assert steady[IDX["syllable_rate"]] == 0


def test_rejects_multichannel():
    with pytest.raises(ValueError):
        prosody_features(np.zeros((2, 1000)), SR)


# ---------------------------------------------------------------- features_for_files


def test_features_for_files_matches_arrays(tmp_path):
    rng = np.random.default_rng(0)
    waves = [harmonic_tone(f, dur=d, amp=a) for f, d, a in [(120, 0.7, 0.2), (220, 1.1, 0.5), (310, 0.9, 0.1)]]
    waves.append(np.zeros(SR // 2, dtype=np.float32))
    waves.append((0.05 * rng.standard_normal(SR)).astype(np.float32))
    paths = []
    for i, w in enumerate(waves):
        p = tmp_path / f"clip{i}.wav"
        sf.write(p, w, SR, subtype="FLOAT")
        paths.append(p)
    expected = np.stack([prosody_features(w, SR) for w in waves])
    got = features_for_files(paths)
    assert got.shape == (len(waves), len(PROSODY_FEATURES)) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    got_pool = features_for_files([str(p) for p in paths], workers=2)
    np.testing.assert_allclose(got_pool, expected, rtol=1e-6, atol=1e-6)
    assert features_for_files([]).shape == (0, len(PROSODY_FEATURES))


def test_features_for_files_pcm16_and_stereo(tmp_path):
    w = harmonic_tone(200, dur=0.8)
    p16 = tmp_path / "pcm16.wav"
    sf.write(p16, w, SR, subtype="PCM_16")
    v = features_for_files([p16])[0]
    assert v[IDX["f0_mean"]] == pytest.approx(200, rel=0.05)
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([w, w], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(features_for_files([stereo])[0], prosody_features(w, SR), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- fit_and_score_references


def _pitch_dataset(n_per_class: int, rng: np.random.Generator):
    """Class determined by pitch; duration and level independent of class."""
    feats, labels = [], []
    for label, f0 in (("low", 120.0), ("mid", 200.0), ("high", 300.0)):
        for _ in range(n_per_class):
            x = harmonic_tone(f0 * rng.uniform(0.93, 1.07), dur=rng.uniform(0.4, 1.2),
                              amp=rng.uniform(0.05, 0.5), noise=0.003, rng=rng)
            feats.append(prosody_features(x, SR))
            labels.append(label)
    order = rng.permutation(len(labels))
    return np.stack(feats)[order], [labels[i] for i in order]


def _duration_dataset(n_per_class: int, rng: np.random.Generator):
    """Class determined by duration; pitch and level independent of class."""
    feats, labels = [], []
    for label, (lo, hi) in (("short", (0.3, 0.5)), ("medium", (0.7, 0.9)), ("long", (1.1, 1.3))):
        for _ in range(n_per_class):
            x = harmonic_tone(rng.uniform(110, 320), dur=rng.uniform(lo, hi), amp=rng.uniform(0.05, 0.5))
            feats.append(prosody_features(x, SR))
            labels.append(label)
    order = rng.permutation(len(labels))
    return np.stack(feats)[order], [labels[i] for i in order]


def test_pitch_determined_classes():
    rng = np.random.default_rng(7)
    x_tr, y_tr = _pitch_dataset(30, rng)
    x_te, y_te = _pitch_dataset(20, rng)
    results = fit_and_score_references(x_tr, y_tr, x_te, y_te, seed=3)
    assert [r.name for r in results] == ["duration", "prosody"]
    by_name = {r.name: r for r in results}
    for r in results:
        assert r.y_true == list(y_te) and len(r.y_pred) == len(y_te)
        assert set(r.y_pred) <= set(y_tr)
        assert isinstance(r.description, str) and "\n" not in r.description and r.description
    assert accuracy(by_name["prosody"]) > 0.9
    assert accuracy(by_name["duration"]) < 0.6  # chance is 1/3

    again = fit_and_score_references(x_tr, y_tr, x_te, y_te, seed=3)
    assert [r.y_pred for r in again] == [r.y_pred for r in results]


def test_duration_determined_classes():
    rng = np.random.default_rng(11)
    x_tr, y_tr = _duration_dataset(30, rng)
    x_te, y_te = _duration_dataset(20, rng)
    by_name = {r.name: r for r in fit_and_score_references(x_tr, y_tr, x_te, y_te)}
    assert accuracy(by_name["duration"]) > 0.9


def test_imbalanced_duration_shortcut_not_majority_only():
    # 80/20 imbalance, class fully determined by duration: balanced weighting must still find it.
    rng = np.random.default_rng(5)
    n_tr, n_te = 100, 50
    def make(n):
        y = np.where(rng.random(n) < 0.8, "neutral", "angry")
        d = np.where(y == "neutral", rng.uniform(2.0, 3.0, n), rng.uniform(0.8, 1.5, n))
        x = rng.normal(size=(n, len(PROSODY_FEATURES)))
        x[:, IDX["duration_s"]] = d
        return x, list(y)
    x_tr, y_tr = make(n_tr)
    x_te, y_te = make(n_te)
    dur = fit_and_score_references(x_tr, y_tr, x_te, y_te)[0]
    assert dur.name == "duration" and accuracy(dur) > 0.95


def test_edge_cases_and_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, len(PROSODY_FEATURES)))
    x[:, IDX["duration_s"]] = rng.uniform(1, 3, 10)
    # single training class -> constant prediction
    res = fit_and_score_references(x, ["a"] * 10, x[:4], ["a", "b", "a", "b"])
    assert all(r.y_pred == ["a"] * 4 for r in res)
    # empty test split
    res = fit_and_score_references(x, ["a", "b"] * 5, x[:0], [])
    assert all(r.y_pred == [] and r.y_true == [] for r in res)
    with pytest.raises(ValueError):
        fit_and_score_references(x[:, :3], ["a", "b"] * 5, x, ["a", "b"] * 5)
    with pytest.raises(ValueError):
        fit_and_score_references(x, ["a", "b"] * 4, x, ["a", "b"] * 5)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        fit_and_score_references(bad, ["a", "b"] * 5, x, ["a", "b"] * 5)


def _tones(folder, pitches: dict[str, float], n: int = 6):
    """Clips whose label is carried by pitch: eGeMAPS must find it."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label, pitch in pitches.items():
        for i in range(n):
            t = np.arange(16000) / 16000
            wave = 0.3 * np.sin(2 * np.pi * pitch * (1 + 0.02 * rng.standard_normal()) * t)
            wave += 0.01 * rng.standard_normal(len(t))
            path = folder / f"{label}{i}.wav"
            sf.write(path, wave, 16000)
            paths.append(str(path))
            labels.append(label)
    return paths, labels


def test_the_egemaps_reference_separates_what_its_features_see(tmp_path):
    pytest.importorskip("opensmile", reason="the egemaps reference needs openSMILE: pip install 'pldistill[egemaps]'")
    from pldistill_cli.references import egemaps_features, fit_and_score_egemaps

    paths, labels = _tones(tmp_path, {"low": 120.0, "high": 260.0})
    x = egemaps_features(paths)
    assert x.shape == (12, 88) and np.isfinite(x).all()
    result = fit_and_score_egemaps(x[::2], labels[::2], x[1::2], labels[1::2], seed=0)
    assert result.name == "egemaps" and result.y_pred == labels[1::2]


def test_egemaps_without_opensmile_is_a_one_line_hint(monkeypatch):
    import builtins

    from pldistill_cli.errors import PldistillError
    from pldistill_cli.references import egemaps_features

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "opensmile" else real_import(name, *a, **k))
    with pytest.raises(PldistillError, match=r"pip install 'pldistill\[egemaps\]'.*non-commercial"):
        egemaps_features(["x.wav"])
