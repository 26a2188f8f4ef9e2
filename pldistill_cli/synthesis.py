"""The synthetic emotional-speech generator, rendered offline with espeak-ng: the embedded default corpus
(datasets/synthetic.py) and the pretraining speech of pretrain-encoder and pretrain-teacher.

The corpus needs nothing beyond pip: the espeak-ng shared library and its voice data come from the
``espeakng-loader`` wheel and are driven through :mod:`ctypes` (Debian's espeak-ng is never used).

Design
------
* The 8 RAVDESS emotions (:data:`EMOTIONS`), ``n_speakers`` speakers (each a distinct espeak voice
  variant, see :data:`VOICES`) and ``n_sentences`` short neutral sentences (:data:`SENTENCES`).
  Every speaker says every sentence once per emotion, so neither the voice nor the sentence carries
  any information about the label.
* Emotion lives only in the prosody: speaking rate, base pitch, pitch range, loudness, pauses between
  words, the sentence-final intonation ("." / "!" / "?"), breathiness and a spectral tilt.  Each
  emotion has a mean offset from the speaker's own baseline (:data:`EMOTION_PROSODY`) scaled by a
  per-speaker expressiveness, plus Gaussian spread (:data:`PROSODY_SPREAD`) of roughly the size of the
  gap between neighbouring emotions, so the classes overlap.  Speakers also differ in baseline rate,
  pitch, range and loudness, and get a speaker-level output gain so loudness alone is no clean cue.
* All randomness comes from ``numpy.random.default_rng`` seeded by a hash of (seed, speaker) or
  (seed, utterance id), so an utterance's parameters and audio never depend on generation order.

Determinism note: espeak-ng keeps synthesis state in C globals (pitch flutter phase, glottal cycle
counters, automatic gain control, echo buffer) that survive ``espeak_Terminate``/``espeak_Initialize``.
Rendering utterances one after another in one loaded library therefore gives order-dependent samples.
To make every utterance bit-identical no matter what was rendered before, the library is located once
per process (lazily, under a lock) and copied to a content-addressed file under the temp folder (so no
other user of the wheel's library in the process shares its state), and each utterance is rendered in
a fresh mapping of that copy (``dlopen`` + ``espeak_Initialize`` + synthesis + ``dlclose``, about
7 ms), with espeak's random generator seeded per utterance.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import struct
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PldistillError

__all__ = [
    "EMOTIONS",
    "LABELS",
    "SENTENCES",
    "VOICES",
    "SAMPLE_RATE",
    "EMOTION_PROSODY",
    "PROSODY_SPREAD",
    "EspeakUnavailableError",
    "SyntheticSettings",
    "SyntheticUtterance",
    "plan_corpus",
    "plan_pretraining",
    "plan_emotion_pool",
    "prosody_targets",
    "PRETRAIN_VOICES",
    "PRETRAIN_SENTENCES",
    "PROSODY_TARGETS",
    "synthesize",
    "generate_corpus",
    "render_features",
    "utterance_fingerprint",
]

EMOTIONS: tuple[str, ...] = ("Neutral", "Calm", "Happy", "Sad", "Angry", "Fear", "Disgust", "Surprise")
# The same words in the order the prompt lists them (the paper's for RAVDESS): the synthetic corpus's label set
# and the teacher's pretraining pool's.
LABELS: tuple[str, ...] = ("Happy", "Sad", "Angry", "Neutral", "Disgust", "Surprise", "Fear", "Calm")

# Short, emotionally neutral sentences (5 words each so slow, pause-rich renderings stay < 4 s).
SENTENCES: tuple[str, ...] = (
    "The train leaves at seven.",
    "Put the cups on the table.",
    "We walked to the market.",
    "The meeting starts after lunch.",
    "My brother painted the fence.",
    "The letter came this morning.",
    "Turn left at the corner.",
    "She bought a new coat.",
    "The window is still open.",
    "They will visit on Sunday.",
)

# One espeak voice (language + variant) per speaker, alternating male/female and British/US English.
VOICES: tuple[str, ...] = (
    "en+m1", "en+f1", "en-us+m3", "en+f2", "en+m4", "en-us+f3", "en+m2", "en+f4",
    "en-us+m7", "en+f5", "en+m6", "en-us+f1", "en+m5", "en-us+f4", "en+m3", "en-us+f2",
)

SAMPLE_RATE = 22050  # espeak-ng's native output rate

GENERATOR_VERSION = "pldistill-synthetic/2"  # 2: breathiness replaced a tremolo no model could hear

# Per-emotion mean offsets from the speaker's baseline (multiplied by the speaker's expressiveness):
#   rate  : words per minute        pitch : espeak base pitch (0-100)   range : espeak pitch range (0-100)
#   volume: espeak amplitude        gap   : extra pause between words, in 10 ms units (absolute mean)
#   breathiness: aspiration noise / speech envelope (absolute mean)   tilt: spectral tilt, >0 brighter, <0 darker
#   ending: probabilities of the sentence-final punctuation (".", "!", "?"), i.e. the intonation tune
EMOTION_PROSODY: dict[str, dict[str, object]] = {
    "Neutral":  dict(rate=0,   pitch=0,   range=0,   volume=0,   gap=0.5, breathiness=0.00, tilt=0.00, ending=(0.90, 0.05, 0.05)),
    "Calm":     dict(rate=-18, pitch=-4,  range=-12, volume=-12, gap=1.5, breathiness=0.00, tilt=-0.15, ending=(0.94, 0.03, 0.03)),
    "Happy":    dict(rate=18,  pitch=10,  range=18,  volume=12,  gap=0.5, breathiness=0.06, tilt=0.10, ending=(0.55, 0.40, 0.05)),
    "Sad":      dict(rate=-32, pitch=-9,  range=-18, volume=-22, gap=3.0, breathiness=0.18, tilt=-0.25, ending=(0.90, 0.02, 0.08)),
    "Angry":    dict(rate=22,  pitch=4,   range=12,  volume=30,  gap=0.5, breathiness=0.00, tilt=0.30, ending=(0.45, 0.50, 0.05)),
    "Fear":     dict(rate=28,  pitch=14,  range=-4,  volume=-4,  gap=1.0, breathiness=0.36, tilt=0.05, ending=(0.60, 0.20, 0.20)),
    "Disgust":  dict(rate=-12, pitch=-7,  range=6,   volume=4,   gap=2.5, breathiness=0.06, tilt=-0.05, ending=(0.75, 0.20, 0.05)),
    "Surprise": dict(rate=15,  pitch=16,  range=24,  volume=14,  gap=0.5, breathiness=0.09, tilt=0.10, ending=(0.30, 0.30, 0.40)),
}

# Per-utterance Gaussian spread (standard deviation) around the emotion mean.
PROSODY_SPREAD: dict[str, float] = dict(rate=14.0, pitch=6.0, range=10.0, volume=12.0, gap=1.0, breathiness=0.06, tilt=0.12)

# Per-speaker baselines: (mean, sd) of a Gaussian, or (low, high) of a uniform draw where noted.
SPEAKER_BASELINE = dict(
    rate=(172.0, 10.0),        # wpm
    pitch=(50.0, 7.0),
    range=(50.0, 6.0),
    volume=(100.0, 8.0),
    gain_db=(-6.0, 6.0),       # uniform: output gain after synthesis
    expressiveness=(0.75, 1.25),  # uniform: scales the emotion mean offsets
)

_ENDINGS = (".", "!", "?")
_LIMITS = dict(rate=(95, 320), pitch=(2, 98), range=(2, 100), volume=(30, 190), gap=(0, 8))
_OUTPUT_HEADROOM = 0.5   # linear gain applied to espeak's int16 output before the speaker gain
_PEAK_LIMIT = 0.98


class EspeakUnavailableError(PldistillError, RuntimeError):
    """espeak-ng (from the espeakng-loader wheel) cannot be loaded or fails to synthesise."""


@dataclass(frozen=True)
class SyntheticSettings:
    seed: int = 42
    n_speakers: int = 10
    n_sentences: int = 6          # uses the first n of SENTENCES
    max_seconds: float = 4.0

    def __post_init__(self) -> None:
        if not 1 <= self.n_speakers <= len(VOICES):
            raise ValueError(f"n_speakers must be between 1 and {len(VOICES)}, got {self.n_speakers}")
        if not 1 <= self.n_sentences <= len(SENTENCES):
            raise ValueError(f"n_sentences must be between 1 and {len(SENTENCES)}, got {self.n_sentences}")
        if not self.max_seconds >= 1.5:
            raise ValueError(f"max_seconds must be at least 1.5, got {self.max_seconds}")


@dataclass(frozen=True)
class SyntheticUtterance:
    utt_id: str
    speaker: str
    label: str          # one of EMOTIONS ('' for pretraining speech: plan_pretraining)
    sentence: str
    voice: str          # espeak voice/variant name used
    rate: int           # wpm
    pitch: int          # espeak 0-100
    pitch_range: int    # espeak 0-100
    volume: int         # espeak amplitude
    word_gap: int = 0             # extra pause between words, units of 10 ms
    ending: str = "."             # sentence-final punctuation actually spoken (intonation tune)
    gain_db: float = 0.0          # output gain after synthesis (mostly speaker-level)
    breathiness: float = 0.0      # aspiration noise, relative to the speech envelope (0 = none)
    tilt: float = 0.0             # first-order spectral tilt: >0 brighter, <0 darker
    lead_silence: float = 0.1     # seconds of silence before the speech
    tail_silence: float = 0.15    # seconds of silence after the speech
    sentence_index: int = 1       # 1-based index into SENTENCES
    synth_seed: int = 0           # seed for espeak's internal random generator
    max_seconds: float = 4.0      # the rendered clip is strictly shorter than this

    @property
    def text(self) -> str:
        """The text handed to espeak: the sentence with its drawn final punctuation."""
        return self.sentence.rstrip(".!?") + self.ending


# --------------------------------------------------------------------------------------------------
# Planning (pure numpy, no audio)


def _rng(*parts: object) -> np.random.Generator:
    key = "|".join([GENERATOR_VERSION, *map(str, parts)]).encode("utf-8")
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "little"))


def _speaker_id(index: int) -> str:
    return f"spk{index + 1:02d}"


def _speaker_baseline(seed: int, speaker: str) -> dict[str, float]:
    rng = _rng(seed, "speaker", speaker)
    b = SPEAKER_BASELINE
    return dict(
        rate=float(rng.normal(*b["rate"])),
        pitch=float(rng.normal(*b["pitch"])),
        range=float(rng.normal(*b["range"])),
        volume=float(rng.normal(*b["volume"])),
        gain_db=float(rng.uniform(*b["gain_db"])),
        expressiveness=float(rng.uniform(*b["expressiveness"])),
    )


def _clamp_int(value: float, key: str) -> int:
    lo, hi = _LIMITS[key]
    return int(min(max(round(value), lo), hi))


def _plan_one(settings: SyntheticSettings, spk_index: int, label: str, sent_index: int,
              base: dict[str, float]) -> SyntheticUtterance:
    speaker = _speaker_id(spk_index)
    return _draw_emotional(settings.seed, f"synthetic-{speaker}-{label.lower()}-s{sent_index + 1}", speaker, label,
                           sent_index + 1, SENTENCES[sent_index], VOICES[spk_index], base, settings.max_seconds)


def _draw_emotional(seed: int, utt_id: str, speaker: str, label: str, sentence_index: int, sentence: str,
                    voice: str, base: dict[str, float], max_seconds: float) -> SyntheticUtterance:
    """One emotional utterance: the speaker's baseline `base` plus its expressiveness x times the emotion's
    mean offset, plus the emotion's spread, per prosody setting (value = base + x mean + N(0, sd)); the
    corpus's (plan_corpus) and the teacher's pretraining pool's (plan_emotion_pool) alike. The draws come
    from the utterance's own generator in a fixed order, so each utterance is reproducible on its own."""
    rng = _rng(seed, "utterance", utt_id)
    mean, sd, x = EMOTION_PROSODY[label], PROSODY_SPREAD, base["expressiveness"]
    rate = base["rate"] + x * float(mean["rate"]) + rng.normal(0.0, sd["rate"])
    pitch = base["pitch"] + x * float(mean["pitch"]) + rng.normal(0.0, sd["pitch"])
    prange = base["range"] + x * float(mean["range"]) + rng.normal(0.0, sd["range"])
    volume = base["volume"] + x * float(mean["volume"]) + rng.normal(0.0, sd["volume"])
    gap = x * float(mean["gap"]) + rng.normal(0.0, sd["gap"])
    breathiness = min(max(x * float(mean["breathiness"]) + rng.normal(0.0, sd["breathiness"]), 0.0), 0.6)
    tilt = min(max(x * float(mean["tilt"]) + rng.normal(0.0, sd["tilt"]), -0.6), 0.6)
    ending = _ENDINGS[int(rng.choice(len(_ENDINGS), p=np.asarray(mean["ending"], dtype=float)))]
    gain_db = base["gain_db"] + rng.normal(0.0, 1.0)
    lead = rng.uniform(0.05, 0.25)
    tail = rng.uniform(0.10, 0.30)
    synth_seed = int(rng.integers(1, 2**31 - 1))
    return SyntheticUtterance(
        utt_id=utt_id,
        speaker=speaker,
        label=label,
        sentence=sentence,
        voice=voice,
        rate=_clamp_int(rate, "rate"),
        pitch=_clamp_int(pitch, "pitch"),
        pitch_range=_clamp_int(prange, "range"),
        volume=_clamp_int(volume, "volume"),
        word_gap=_clamp_int(gap, "gap"),
        ending=ending,
        gain_db=round(float(gain_db), 3),
        breathiness=round(float(breathiness), 4),
        tilt=round(float(tilt), 4),
        lead_silence=round(float(lead), 4),
        tail_silence=round(float(tail), 4),
        sentence_index=sentence_index,
        synth_seed=synth_seed,
        max_seconds=float(max_seconds),
    )


def plan_corpus(settings: SyntheticSettings) -> list[SyntheticUtterance]:
    """Deterministic list of utterances with their drawn prosody (no audio).

    Order: speaker, then emotion (in EMOTIONS order), then sentence.  Every speaker says every
    sentence once per emotion.
    """
    plan: list[SyntheticUtterance] = []
    for spk_index in range(settings.n_speakers):
        base = _speaker_baseline(settings.seed, _speaker_id(spk_index))
        for label in EMOTIONS:
            for sent_index in range(settings.n_sentences):
                plan.append(_plan_one(settings, spk_index, label, sent_index, base))
    return plan



# --------------------------------------------------------------------------------------------------
# Emotion-free speech for pretraining a preset's audio encoder (pretrain-encoder)

# Voices and sentences the corpus never uses (other English accents x other espeak variants), so a
# pretrained encoder has heard no speaker and no sentence of any fold.
PRETRAIN_VOICES: tuple[str, ...] = tuple(
    f"{accent}+{variant}"
    for accent in ("en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
    for variant in ("adam", "linda", "m8", "klatt", "klatt2", "quincy", "steph", "robert", "anika", "ed", "john",
                    "belinda", "max", "aunty"))
PRETRAIN_SENTENCES: tuple[str, ...] = (
    "The garden needs more water.", "He parked the car outside.", "The book is on the shelf.",
    "We ordered soup and bread.", "The bus was late again.", "Her phone rang twice today.",
    "The river runs past the mill.", "Close the door behind you.", "The shop opens at nine.",
    "They painted the kitchen blue.", "A dog slept under the bench.", "The clock stopped at noon.",
)
# What the encoder learns to hear: each utterance's prosody settings, drawn uniformly over the range the
# corpus spans, with no emotion behind them. Loudness is espeak's amplitude and the output gain in dB.
PROSODY_TARGETS: tuple[str, ...] = ("rate", "pitch", "range", "loudness", "gap", "breathiness", "tilt")


def plan_pretraining(seed: int, n_clips: int) -> list[SyntheticUtterance]:
    """`n_clips` utterances with independent uniform prosody, in PRETRAIN_VOICES and PRETRAIN_SENTENCES.
    Their label is empty: `prosody_targets` is what they teach."""
    plan = []
    for i in range(n_clips):
        utt_id = f"pretrain-{i + 1:05d}"
        rng = _rng(seed, "pretrain", utt_id)
        plan.append(SyntheticUtterance(
            utt_id=utt_id, speaker="", label="", voice=PRETRAIN_VOICES[int(rng.integers(len(PRETRAIN_VOICES)))],
            sentence=PRETRAIN_SENTENCES[int(rng.integers(len(PRETRAIN_SENTENCES)))],
            rate=int(rng.integers(110, 251)), pitch=int(rng.integers(20, 86)), pitch_range=int(rng.integers(15, 91)),
            volume=int(rng.integers(50, 171)), word_gap=int(rng.integers(0, 5)), ending=_ENDINGS[int(rng.integers(3))],
            gain_db=float(rng.uniform(-10.0, 3.0)), breathiness=float(rng.uniform(0.0, 0.5)) * (rng.random() < 0.5),
            tilt=float(rng.uniform(-0.45, 0.45)),
            lead_silence=float(rng.uniform(0.05, 0.25)), tail_silence=float(rng.uniform(0.10, 0.30)),
            synth_seed=int(rng.integers(1, 2**31 - 1))))
    return plan


def plan_emotion_pool(seed: int, n_voices: int, n_sentences: int, max_seconds: float = 4.0) -> list[SyntheticUtterance]:
    """Labelled emotional speech for pretraining a preset's teacher (pretrain-teacher): the corpus's emotions
    (EMOTION_PROSODY, PROSODY_SPREAD, SPEAKER_BASELINE: the same generator) spoken in the first `n_voices` of
    PRETRAIN_VOICES and PRETRAIN_SENTENCES, which no fold uses. Each voice says `n_sentences` sentences, a
    window of PRETRAIN_SENTENCES that starts one further for each voice (so every sentence is spoken by as
    many voices as the others), once per emotion: n_voices x 8 x n_sentences clips, balanced per voice.
    Speaker ids are `pool01`..; utterance ids `pool-pool01-happy-s3` (s = the 1-based PRETRAIN_SENTENCES index)."""
    if not 1 <= n_voices <= len(PRETRAIN_VOICES):
        raise ValueError(f"n_voices must be between 1 and {len(PRETRAIN_VOICES)}, got {n_voices}")
    if not 1 <= n_sentences <= len(PRETRAIN_SENTENCES):
        raise ValueError(f"n_sentences must be between 1 and {len(PRETRAIN_SENTENCES)}, got {n_sentences}")
    plan = []
    for v in range(n_voices):
        speaker = f"pool{v + 1:02d}"
        base = _speaker_baseline(seed, speaker)
        for label in EMOTIONS:
            for k in range(n_sentences):
                s = (v + k) % len(PRETRAIN_SENTENCES)
                utt_id = f"pool-{speaker}-{label.lower()}-s{s + 1}"
                plan.append(_draw_emotional(seed, utt_id, speaker, label, s + 1, PRETRAIN_SENTENCES[s],
                                            PRETRAIN_VOICES[v], base, max_seconds))
    return plan


def prosody_targets(utt: SyntheticUtterance) -> tuple[list[float], int]:
    """The PROSODY_TARGETS values of an utterance, and the index of its final punctuation (its tune)."""
    loudness = 20.0 * np.log10(utt.volume) + utt.gain_db
    values = [utt.rate, utt.pitch, utt.pitch_range, loudness, utt.word_gap, utt.breathiness, utt.tilt]
    return [float(v) for v in values], _ENDINGS.index(utt.ending)

# --------------------------------------------------------------------------------------------------
# espeak-ng through ctypes

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_INSTALL_HINT = "run `pip install espeakng-loader` (the synthetic corpus needs its bundled espeak-ng)"


class _Espeak:
    """Locates the wheel's espeak-ng once per process; renders each utterance in a fresh mapping."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise EspeakUnavailableError(f"espeak-ng is not available ({exc}); {_INSTALL_HINT}") from None
        try:
            self.source_lib = str(espeakng_loader.get_library_path())
            self.data_path = str(espeakng_loader.get_data_path())
        except Exception as exc:  # the wheel raises RuntimeError when its data folder is missing
            raise EspeakUnavailableError(f"espeak-ng data not found ({exc}); {_INSTALL_HINT}") from None
        if not os.path.isfile(self.source_lib):
            raise EspeakUnavailableError(f"espeak-ng library missing at {self.source_lib}; {_INSTALL_HINT}")
        self.pid = os.getpid()
        self.lib_path = self._private_copy()
        self.chunks: list[np.ndarray] = []
        self.callback = _SYNTH_CALLBACK(self._on_samples)
        # Fail early, with the clear message, if the library cannot be loaded and initialised.
        lib = self._open()
        try:
            self._initialise(lib)
        finally:
            self._close(lib)

    # -- library mapping ---------------------------------------------------------------------------
    def _private_copy(self) -> str:
        """A copy of the library under another file name, so that this module's dlopen/dlclose cycle
        never shares C state with other users of the wheel's library in the same process.

        The copy is content-addressed and shared by all processes of this user (written atomically,
        never deleted, ~0.7 MB), so worker processes and killed runs leave nothing behind.
        """
        try:
            with open(self.source_lib, "rb") as fh:
                blob = fh.read()
            digest = hashlib.sha256(blob).hexdigest()[:16]
            uid = os.getuid() if hasattr(os, "getuid") else "user"
            folder = os.path.join(tempfile.gettempdir(), f"pldistill-espeak-{uid}")
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if hasattr(os, "getuid") and os.stat(folder).st_uid != os.getuid():
                raise OSError(f"{folder} belongs to another user")
            path = os.path.join(folder, f"libespeak-ng-{digest}{os.path.splitext(self.source_lib)[1]}")
            current = None
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    current = fh.read()
            if current != blob:
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(blob)
                os.replace(tmp, path)
            self._dlclose(ctypes.CDLL(path))  # probe: a noexec temp folder makes this fail
        except OSError:
            return self.source_lib  # still works; only loses isolation from other users of the library
        return path

    @staticmethod
    def _dlclose(lib: ctypes.CDLL) -> None:
        import _ctypes

        closer = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
        if closer is not None:
            closer(lib._handle)

    def _open(self) -> ctypes.CDLL:
        if not os.path.isfile(self.lib_path):  # e.g. a temp cleaner removed our copy
            self.lib_path = self._private_copy()
        try:
            lib = ctypes.CDLL(self.lib_path, mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError as exc:
            raise EspeakUnavailableError(f"cannot load espeak-ng library {self.lib_path} ({exc}); {_INSTALL_HINT}") from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
        return lib

    def _close(self, lib: ctypes.CDLL) -> None:
        try:
            lib.espeak_Terminate()
        finally:
            self._dlclose(lib)

    def _initialise(self, lib: ctypes.CDLL) -> int:
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if rate <= 0:
            raise EspeakUnavailableError(f"espeak-ng failed to initialise with data at {self.data_path}; {_INSTALL_HINT}")
        if rate != SAMPLE_RATE:
            raise EspeakUnavailableError(f"espeak-ng reports sample rate {rate}, expected {SAMPLE_RATE}; {_INSTALL_HINT}")
        lib.espeak_SetSynthCallback(self.callback)
        return rate

    def _on_samples(self, wav, n, _events) -> int:
        if n > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.int16, copy=True))
        return 0  # 0 = continue synthesis

    # -- synthesis ---------------------------------------------------------------------------------
    def render(self, utt: SyntheticUtterance) -> np.ndarray:
        """Raw int16 espeak output for one utterance, from a freshly initialised library."""
        lib = self._open()
        try:
            self._initialise(lib)
            if hasattr(lib, "espeak_ng_SetRandSeed"):
                lib.espeak_ng_SetRandSeed(int(utt.synth_seed))
            if lib.espeak_SetVoiceByName(utt.voice.encode()) != 0:
                raise EspeakUnavailableError(f"espeak-ng voice {utt.voice!r} not found in {self.data_path}; {_INSTALL_HINT}")
            for param, value in ((_PARAM_RATE, utt.rate), (_PARAM_VOLUME, utt.volume), (_PARAM_PITCH, utt.pitch),
                                 (_PARAM_RANGE, utt.pitch_range), (_PARAM_WORDGAP, utt.word_gap)):
                if lib.espeak_SetParameter(param, int(value), 0) != 0:
                    raise EspeakUnavailableError(f"espeak-ng rejected parameter {param}={value} for {utt.utt_id}")
            self.chunks = []
            text = utt.text.encode("utf-8") + b"\0"
            status = lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != 0:
                raise EspeakUnavailableError(f"espeak-ng synthesis failed for {utt.utt_id} (status {status})")
            lib.espeak_Synchronize()
            chunks, self.chunks = self.chunks, []
        finally:
            self._close(lib)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


_LOCK = threading.Lock()
_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    """The process-wide espeak handle (call with _LOCK held); re-created in a forked child."""
    global _ENGINE
    if _ENGINE is None or _ENGINE.pid != os.getpid():
        _ENGINE = _Espeak()
    return _ENGINE


# --------------------------------------------------------------------------------------------------
# Rendering


def _trim(raw: np.ndarray, threshold: int = 64, margin: int = 220) -> np.ndarray:
    loud = np.flatnonzero(np.abs(raw.astype(np.int32)) > threshold)
    if loud.size == 0:
        return raw[:0]
    return raw[max(int(loud[0]) - margin, 0): int(loud[-1]) + margin + 1]


def _same_energy(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y scaled to x's energy (sum of squares), so a timbre effect does not change the loudness."""
    return y * np.sqrt(float(np.sum(x * x)) / max(float(np.sum(y * y)), 1e-12))


def synthesize(utt: SyntheticUtterance) -> tuple[np.ndarray, int]:
    """Render one utterance: float32 mono waveform in [-1, 1] and its sample rate (espeak's native rate, 22050).

    The samples are exact multiples of 1/32768, so writing them as PCM16 and reading them back is lossless.
    """
    with _LOCK:
        raw = _engine().render(utt)
    speech = _trim(raw)
    if speech.size == 0:
        raise EspeakUnavailableError(f"espeak-ng produced silence for {utt.utt_id} ({utt.text!r})")
    sr = SAMPLE_RATE
    x = speech.astype(np.float64) / 32768.0

    # Spectral tilt: y[n] = x[n] - tilt * x[n-1] (tilt > 0 pre-emphasis/brighter, < 0 smoother/darker),
    # Energy-preserving, so the tilt changes timbre and not loudness.
    if utt.tilt:
        x = _same_energy(x - utt.tilt * np.concatenate(([0.0], x[:-1])), x)
    # Breathiness: aspiration noise that follows the speech envelope (10 ms RMS), first-differenced so it
    # lies mostly above 2 kHz like real aspiration; energy-preserving, like the tilt. (Version 1 had a 4-8 Hz
    # amplitude tremolo instead: under espeak's own syllable rhythm, no encoder or feature here heard it.)
    if utt.breathiness > 0:
        window = int(0.01 * sr)
        envelope = np.sqrt(np.convolve(x * x, np.ones(window) / window, mode="same"))
        noise = np.diff(np.random.default_rng(utt.synth_seed).standard_normal(x.size), prepend=0.0) / np.sqrt(2.0)
        x = _same_energy(x + utt.breathiness * envelope * noise, x)
    x = x * (_OUTPUT_HEADROOM * 10.0 ** (utt.gain_db / 20.0))
    peak = float(np.max(np.abs(x)))
    if peak > _PEAK_LIMIT:
        x = x * (_PEAK_LIMIT / peak)

    # Fit strictly under max_seconds: keep the silences, shorten the speech with a short fade if needed.
    lead = int(round(utt.lead_silence * sr))
    tail = int(round(utt.tail_silence * sr))
    limit = int(np.floor(utt.max_seconds * sr)) - 1
    room = limit - lead - tail
    if room < sr // 4:  # pathological settings: drop the silences first
        lead, tail, room = 0, 0, limit
    if x.size > room:
        fade = min(int(0.03 * sr), room)
        x = x[:room].copy()
        x[room - fade:] *= np.linspace(1.0, 0.0, fade)
    out = np.concatenate((np.zeros(lead), x, np.zeros(tail)))
    q = np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)
    return q.astype(np.float32) / np.float32(32768.0), sr


# --------------------------------------------------------------------------------------------------
# Corpus files


@functools.lru_cache(maxsize=1)
def _loader_version() -> str:
    try:
        from importlib.metadata import version

        return version("espeakng-loader")
    except Exception:
        return "unknown"


def utterance_fingerprint(utt: SyntheticUtterance) -> str:
    """Identifies the exact audio an utterance renders to (parameters, generator and espeak version)."""
    payload = json.dumps(asdict(utt), sort_keys=True) + f"|{GENERATOR_VERSION}|{SAMPLE_RATE}|{_loader_version()}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def _comment(utt: SyntheticUtterance) -> bytes:
    return f"{GENERATOR_VERSION} {utt.utt_id} {utterance_fingerprint(utt)}".encode("ascii")


def _wav_bytes(samples: np.ndarray, sr: int, comment: bytes) -> bytes:
    """A plain PCM16 mono RIFF/WAVE file with an INFO/ICMT comment chunk after the data."""
    q = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    data = q.tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, sr, sr * 2, 2, 16)
    text = comment + b"\0"
    if len(text) % 2:
        text += b"\0"
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(text)) + text
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
            + b"LIST" + struct.pack("<I", len(info)) + info)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _wav_matches(path: Path, sr: int, comment: bytes) -> bool:
    """True if ``path`` is a complete PCM16 mono WAV at ``sr`` whose comment is ``comment``."""
    try:
        blob = path.read_bytes()
    except OSError:
        return False
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        return False
    if struct.unpack("<I", blob[4:8])[0] + 8 != len(blob):
        return False
    pos, fmt_ok, data_ok, found = 12, False, False, None
    while pos + 8 <= len(blob):
        cid, size = blob[pos:pos + 4], struct.unpack("<I", blob[pos + 4:pos + 8])[0]
        body = blob[pos + 8:pos + 8 + size]
        if len(body) != size:
            return False
        if cid == b"fmt ":
            fmt_ok = size >= 16 and struct.unpack("<HHIIHH", body[:16]) == (1, 1, sr, sr * 2, 2, 16)
        elif cid == b"data":
            data_ok = size > 0
        elif cid == b"LIST" and body[:4] == b"INFO":
            sub = 4
            while sub + 8 <= len(body):
                sid, ssize = body[sub:sub + 4], struct.unpack("<I", body[sub + 4:sub + 8])[0]
                if sid == b"ICMT":
                    found = body[sub + 8:sub + 8 + ssize].rstrip(b"\0")
                sub += 8 + ssize + (ssize % 2)
        pos += 8 + size + (size % 2)
    return fmt_ok and data_ok and found == comment


def generate_corpus(out_dir: Path, settings: SyntheticSettings,
                    on_progress: Callable[[], None] | None = None) -> list[SyntheticUtterance]:
    """Write <out_dir>/<utt_id>.wav (PCM16, native rate) for every planned utterance; an existing
    file with the right content is not re-rendered (resumable); write atomically (temp file then
    os.replace). Calls on_progress() once per utterance. Returns the plan.

    "Right content" is checked without rendering: each file carries a comment chunk with a fingerprint
    of its utterance's parameters, the generator version and the espeakng-loader version.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_corpus(settings)
    for utt in plan:
        path = out_dir / f"{utt.utt_id}.wav"
        comment = _comment(utt)
        if not _wav_matches(path, SAMPLE_RATE, comment):
            samples, sr = synthesize(utt)
            blob = _wav_bytes(samples, sr, comment)
            tmp = out_dir / f".{utt.utt_id}.wav.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(blob)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
        if on_progress is not None:
            on_progress()
    return plan


# --------------------------------------------------------------------------------------------------
# Pretraining input (pretrain-encoder, pretrain-teacher)


def render_features(plan: list[SyntheticUtterance], rate: int, featurize: Callable, advance: Callable[[int], None],
                    batch: int = 64) -> tuple:
    """A plan's utterances rendered in memory, resampled to `rate` Hz and turned into the encoder's input
    `batch` clips at a time: (features, feature mask, durations in seconds). `featurize(waves)` gives
    (features, mask) of a list of waves (forward.audio_features with the model's processor); `advance(n)`
    is told after each batch. torch is imported here: the corpus (generate_corpus) needs no torch."""
    import torch
    import torchaudio.functional as AF

    features, masks, durations = [], [], []
    for start in range(0, len(plan), batch):
        waves = [AF.resample(torch.from_numpy(synthesize(u)[0]), SAMPLE_RATE, rate).numpy()
                 for u in plan[start:start + batch]]
        f, m = featurize(waves)
        features.append(f), masks.append(m), durations.extend(len(w) / rate for w in waves)
        advance(len(waves))
    return torch.cat(features), torch.cat(masks), durations
