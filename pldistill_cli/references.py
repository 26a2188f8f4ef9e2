"""Reference rows for the report: how far do shortcuts get on a speech-emotion data set?

Two deliberately simple classifiers are trained on a fold's training split and scored on its
test split:

* ``duration`` -- multinomial logistic regression on clip duration alone
  (standardised ``[log d, (log d)^2]``, so a class may own a band of durations);
* ``prosody``  -- ``StandardScaler`` + multinomial logistic regression on all
  :data:`PROSODY_FEATURES` (pitch, energy, rate, spectral shape).

Both use ``class_weight='balanced'`` so that, under class imbalance, they are not reduced to
"always predict the majority class" (speech-emotion results are usually reported as unweighted
recall, where that would score exactly chance).

Feature extraction is plain numpy (+ ``scipy.signal.find_peaks``) on 25 ms analysis windows
with a 10 ms hop. Pitch is tracked with a YIN-style cumulative-mean-normalised difference
function (60-500 Hz), computed for all frames at once with FFTs.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from scipy.signal import find_peaks

__all__ = [
    "PROSODY_FEATURES",
    "ReferenceResult",
    "features_for_files",
    "fit_and_score_references",
    "prosody_features",
]

# Units (all float64):
#   duration_s              seconds (whole clip)
#   f0_mean                 Hz, mean F0 over voiced frames (0 if none)
#   f0_std                  semitones, std of 12*log2(F0) over voiced frames (0 if < 2)
#   f0_range                semitones, p90 - p10 of 12*log2(F0) over voiced frames (0 if < 2)
#   voiced_fraction         0..1, voiced frames / all frames
#   rms_mean_db             dBFS, mean frame RMS level over active frames (-100 floor)
#   rms_std_db              dB, std of frame level over active frames
#   rms_range_db            dB, p90 - p10 of frame level over active frames
#   active_fraction         0..1, active (non-silent) frames / all frames
#   syllable_rate           energy-envelope peaks per second of active time
#   spectral_centroid_mean  Hz, mean spectral centroid over active frames
#   zcr_mean                zero crossings per second, mean over active frames
PROSODY_FEATURES: tuple[str, ...] = (
    "duration_s",
    "f0_mean",
    "f0_std",
    "f0_range",
    "voiced_fraction",
    "rms_mean_db",
    "rms_std_db",
    "rms_range_db",
    "active_fraction",
    "syllable_rate",
    "spectral_centroid_mean",
    "zcr_mean",
)

# Analysis parameters (times in seconds).
WINDOW_S = 0.025
HOP_S = 0.010
F0_MIN_HZ = 60.0
F0_MAX_HZ = 500.0
YIN_THRESHOLD = 0.2  # voiced if the normalised difference dips below this
DB_FLOOR = -100.0  # level assigned to digital silence
ACTIVE_REL_DB = 35.0  # a frame is active if within this many dB of the loudest frame ...
ACTIVE_ABS_DB = -80.0  # ... and above this absolute level (dBFS)
SYLLABLE_PROMINENCE_DB = 4.0  # minimum prominence of an energy peak counted as a syllable
SYLLABLE_MIN_GAP_S = 0.10  # at most ~10 syllables per second
ENVELOPE_SMOOTH_S = 0.05


def _frame_view(x: np.ndarray, n_frames: int, length: int, hop: int) -> np.ndarray:
    """[n_frames, length] strided view of ``x`` (which must be long enough)."""
    return np.lib.stride_tricks.as_strided(
        x, shape=(n_frames, length), strides=(x.strides[0] * hop, x.strides[0]), writeable=False
    )


def _yin_f0(frames: np.ndarray, window: int, tau_min: int, tau_max: int, sample_rate: int):
    """F0 (Hz) and voicing for each row of ``frames`` ([n, window + tau_max]).

    YIN difference d(tau) = sum_{j<W} (x_j - x_{j+tau})^2, via FFT cross-correlation,
    cumulative-mean-normalised; the first local minimum below the threshold in
    [tau_min, tau_max] is the period, refined by parabolic interpolation.
    """
    n, length = frames.shape
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    n_fft = 1 << (length - 1).bit_length()
    head = frames[:, :window]
    spec_a = np.fft.rfft(head, n_fft, axis=1)
    spec_b = np.fft.rfft(frames, n_fft, axis=1)
    # r(tau) = sum_{j<W} x_j x_{j+tau}; no circular wrap since j + tau < length <= n_fft.
    r = np.fft.irfft(np.conj(spec_a) * spec_b, n_fft, axis=1)[:, : tau_max + 1]
    sq = np.concatenate([np.zeros((n, 1)), np.cumsum(frames**2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    energy_0 = sq[:, window][:, None]
    energy_tau = sq[:, taus + window] - sq[:, taus]
    diff = np.maximum(energy_0 + energy_tau - 2.0 * r, 0.0)

    cum = np.cumsum(diff[:, 1:], axis=1)
    cmndf = np.ones_like(diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = diff[:, 1:] * taus[1:] / cum
    cmndf[:, 1:] = np.where(cum > 1e-12 * (energy_0 + 1e-20), ratio, 1.0)
    cmndf = np.nan_to_num(cmndf, nan=1.0, posinf=1.0, neginf=1.0)

    # Local minima below threshold in [tau_min, tau_max - 1]; take the first.
    lo, hi = tau_min, tau_max - 1
    mid = cmndf[:, lo : hi + 1]
    left = cmndf[:, lo - 1 : hi]
    right = cmndf[:, lo + 1 : hi + 2]
    cand = (mid <= left) & (mid < right) & (mid < YIN_THRESHOLD)
    voiced = cand.any(axis=1)
    first = np.argmax(cand, axis=1)
    tau = first + lo
    rows = np.arange(n)
    y0, y1, y2 = cmndf[rows, tau - 1], cmndf[rows, tau], cmndf[rows, tau + 1]
    denom = y0 - 2.0 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(np.abs(denom) > 1e-12, 0.5 * (y0 - y2) / denom, 0.0)
    period = tau + np.clip(shift, -0.5, 0.5)
    f0 = np.where(voiced, sample_rate / period, 0.0)
    return f0, voiced


def _pct_range(values: np.ndarray) -> float:
    if values.size < 2:
        return 0.0
    p10, p90 = np.percentile(values, [10, 90])
    return float(p90 - p10)


def prosody_features(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Feature vector (float64, ``len(PROSODY_FEATURES)``) for one mono clip.

    ``wave`` is a 1-D float array (a ``[1, n]`` or ``[n, 1]`` array is accepted too). The result
    is finite for any finite input; silence and clips shorter than one window get neutral
    fallbacks (0 for pitch/rate/spectral features, ``-100`` dBFS level).
    """
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim > 1:
        x = np.squeeze(x)
    if x.ndim != 1:
        raise ValueError(f"expected a mono (1-D) waveform, got shape {np.shape(wave)}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    out = dict.fromkeys(PROSODY_FEATURES, 0.0)
    out["duration_s"] = x.size / sample_rate
    out["rms_mean_db"] = DB_FLOOR
    if x.size == 0:
        return np.array([out[k] for k in PROSODY_FEATURES], dtype=np.float64)
    x = x - x.mean()

    window = max(2, int(round(WINDOW_S * sample_rate)))
    hop = max(1, int(round(HOP_S * sample_rate)))
    tau_min = max(2, int(math.floor(sample_rate / F0_MAX_HZ)))
    tau_max = max(tau_min + 2, int(math.ceil(sample_rate / F0_MIN_HZ)))
    n_frames = 1 + max(0, (x.size - window) // hop)
    # Pad so every frame has window + tau_max samples for the pitch lag search.
    need = (n_frames - 1) * hop + window + tau_max
    xp = np.zeros(max(need, x.size))
    xp[: x.size] = x
    frames = _frame_view(xp, n_frames, window + tau_max, hop)
    head = frames[:, :window]

    # Level.
    power = np.mean(head**2, axis=1)
    level_db = np.maximum(10.0 * np.log10(power + 1e-30), DB_FLOOR)
    active = (level_db > level_db.max() - ACTIVE_REL_DB) & (level_db > ACTIVE_ABS_DB)
    n_active = int(active.sum())
    out["active_fraction"] = n_active / n_frames

    # Pitch (only active frames can be voiced).
    f0, voiced = _yin_f0(np.ascontiguousarray(frames), window, tau_min, tau_max, sample_rate)
    voiced &= active
    out["voiced_fraction"] = float(voiced.sum()) / n_frames
    if voiced.any():
        f0v = f0[voiced]
        st = 12.0 * np.log2(f0v)
        out["f0_mean"] = float(f0v.mean())
        out["f0_std"] = float(st.std()) if st.size > 1 else 0.0
        out["f0_range"] = _pct_range(st)

    if n_active == 0:
        return np.array([out[k] for k in PROSODY_FEATURES], dtype=np.float64)

    lv = level_db[active]
    out["rms_mean_db"] = float(lv.mean())
    out["rms_std_db"] = float(lv.std())
    out["rms_range_db"] = _pct_range(lv)

    # Syllable rate: prominent peaks of the smoothed level envelope, per second of active time.
    k = max(1, int(round(ENVELOPE_SMOOTH_S / HOP_S)))
    env = np.convolve(level_db, np.ones(k) / k, mode="same") if n_frames >= k else level_db
    peaks, _ = find_peaks(
        env,
        prominence=SYLLABLE_PROMINENCE_DB,
        distance=max(1, int(round(SYLLABLE_MIN_GAP_S / HOP_S))),
    )
    peaks = peaks[active[peaks]]
    out["syllable_rate"] = peaks.size / (n_active * hop / sample_rate)

    # Spectral centroid and zero-crossing rate over active frames.
    act = head[active]
    n_fft = 1 << (window - 1).bit_length()
    mag = np.abs(np.fft.rfft(act * np.hanning(window), n_fft, axis=1))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    total = mag.sum(axis=1)
    centroid = np.where(total > 0, (mag @ freqs) / np.where(total > 0, total, 1.0), 0.0)
    out["spectral_centroid_mean"] = float(centroid.mean())
    sign = np.signbit(act)
    zc = np.mean(sign[:, 1:] != sign[:, :-1], axis=1)
    out["zcr_mean"] = float(zc.mean() * sample_rate)

    vec = np.array([out[k] for k in PROSODY_FEATURES], dtype=np.float64)
    return np.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0)


def _features_for_file(path: str | Path) -> np.ndarray:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return prosody_features(mono, sr)


def features_for_files(paths: Sequence[Path], workers: int = 1) -> np.ndarray:
    """``[N, len(PROSODY_FEATURES)]`` features for audio files, in the order given.

    Files are read with soundfile as float32 (multi-channel files are averaged to mono) at their
    own sample rate. ``workers > 1`` uses a process pool.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return np.zeros((0, len(PROSODY_FEATURES)), dtype=np.float64)
    if workers <= 1 or len(paths) < 2:
        rows = [_features_for_file(p) for p in paths]
    else:
        n_workers = min(workers, len(paths))
        chunk = max(1, len(paths) // (n_workers * 8))
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            rows = list(pool.map(_features_for_file, paths, chunksize=chunk))
    return np.stack(rows).astype(np.float64, copy=False)


@dataclass
class ReferenceResult:
    name: str  # "duration" or "prosody"
    description: str  # one line, for the report
    y_true: list[str]
    y_pred: list[str]


def _check_features(name: str, feats: np.ndarray, n_labels: int) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(PROSODY_FEATURES):
        raise ValueError(
            f"{name} must have shape [N, {len(PROSODY_FEATURES)}] (PROSODY_FEATURES), got {arr.shape}"
        )
    if arr.shape[0] != n_labels:
        raise ValueError(f"{name} has {arr.shape[0]} rows but {n_labels} labels")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _duration_design(feats: np.ndarray) -> np.ndarray:
    d = feats[:, PROSODY_FEATURES.index("duration_s")]
    z = np.log(np.maximum(d, 1e-3))
    return np.column_stack([z, z**2])


def _fit_predict(model, x_train, y_train, x_test) -> list[str]:
    if x_test.shape[0] == 0:
        return []
    classes = sorted(set(y_train))
    if len(classes) == 1:  # nothing to learn; logistic regression would refuse
        return [classes[0]] * x_test.shape[0]
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    return [str(p) for p in model.predict(x_test)]


def _logreg(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=5000, C=1.0, class_weight="balanced", random_state=seed),
    )


def egemaps_features(paths: Sequence[str]) -> np.ndarray:
    """The 88 eGeMAPS v02 functionals of each file (Eyben et al., 2016), the standard SER baseline's
    features, computed by openSMILE (the `egemaps` extra; audEERING's research licence: non-commercial)."""
    try:
        import opensmile
    except ImportError:
        from .errors import PldistillError

        raise PldistillError("params.yaml: evaluate.references lists egemaps, which needs openSMILE: "
                             "`pip install 'pldistill[egemaps]'` (its licence allows non-commercial use only)") from None
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)
    return np.stack([smile.process_file(str(p)).to_numpy()[0] for p in paths]).astype(np.float64)


def fit_and_score_egemaps(train_features: np.ndarray, train_labels: Sequence[str], test_features: np.ndarray,
                          test_labels: Sequence[str], seed: int = 42) -> ReferenceResult:
    """The usual eGeMAPS linear baseline: standardised functionals, balanced logistic regression."""
    x_train = np.nan_to_num(train_features, nan=0.0, posinf=0.0, neginf=0.0)
    x_test = np.nan_to_num(test_features, nan=0.0, posinf=0.0, neginf=0.0)
    predictions = _fit_predict(_logreg(seed), x_train, [str(y) for y in train_labels], x_test)
    return ReferenceResult(name="egemaps", y_true=[str(y) for y in test_labels], y_pred=predictions,
                           description="balanced logistic regression on the 88 eGeMAPS v02 functionals (openSMILE)")


def fit_and_score_references(
    train_features: np.ndarray,
    train_labels: Sequence[str],
    test_features: np.ndarray,
    test_labels: Sequence[str],
    seed: int = 42,
) -> list[ReferenceResult]:
    """Fit the two reference classifiers on train and predict test; returns
    ``[duration, prosody]``.

    * duration: StandardScaler + LogisticRegression(class_weight='balanced') on
      ``[log d, (log d)^2]`` of the ``duration_s`` column;
    * prosody: StandardScaler + LogisticRegression(class_weight='balanced', max_iter=5000) on all
      ``PROSODY_FEATURES``.

    Deterministic for a given seed (lbfgs solver). With a single training class, that class is
    predicted everywhere.
    """
    y_train = [str(y) for y in train_labels]
    y_test = [str(y) for y in test_labels]
    x_train = _check_features("train_features", train_features, len(y_train))
    x_test = _check_features("test_features", test_features, len(y_test))
    if not y_train:
        raise ValueError("train split is empty")

    dur_pred = _fit_predict(_logreg(seed), _duration_design(x_train), y_train, _duration_design(x_test))
    pros_pred = _fit_predict(_logreg(seed), x_train, y_train, x_test)
    n_feat = len(PROSODY_FEATURES)
    return [
        ReferenceResult(
            name="duration",
            description="balanced logistic regression on clip duration alone ([log d, log^2 d])",
            y_true=list(y_test),
            y_pred=dur_pred,
        ),
        ReferenceResult(
            name="prosody",
            description=(
                f"balanced logistic regression on {n_feat} prosody features "
                "(pitch, energy, rate, spectral shape)"
            ),
            y_true=list(y_test),
            y_pred=pros_pred,
        ),
    ]
