"""Checks that need no model, run before torch or transformers is imported: whether a stage's input files
are whole (Parquet footers, JSON that parses, safetensors headers that fit their files), whether settings
fit the teacher (its config.json), the device, the launcher's process count, an export's destination,
and predict's audio inputs (folders expanded to the audio files inside). Each failure is one
PldistillError naming the file or setting and what to do."""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path

from .errors import PldistillError

AUDIO_SUFFIXES = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aiff .aif .aifc .au .snd .caf .w64 .rf64 .sph .nist .voc".split()
)
METADATA_FILE = "pldistill.json"  # what made a model folder (models.py writes it); here so the CLI needs no torch
SILENCE_PEAK = 1e-4  # a clip whose peak stays below this (-80 dBFS) carries no speech
MIN_SECONDS = 0.2  # the default of preprocess.min_seconds: the shortest clip a model is trained on


def how_to_make(path: Path | str) -> str:
    """`pldistill <command> --options` that makes `path` (an output of the DVC graph), or ''."""
    from .graph import STAGES, producer

    made = producer(str(path))
    if not made:
        return ""
    return f"pldistill {STAGES[made[0]].cli(made[1])}"


def _redo(folder: Path) -> str:
    command = how_to_make(folder)
    return f"re-run `{command}`" if command else "re-run the stage that made it"


# ----------------------------------------------------------------------------------------- whole files


def _parquet(path: Path) -> str | None:
    """Parquet starts and ends with PAR1, the footer's length just before the end."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(size - 8, 0))
        tail = f.read(8)
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        return "truncated or not Parquet: no Parquet footer"
    if struct.unpack("<I", tail[:4])[0] > size - 12:
        return "truncated: its footer runs past the start of the file"
    return None


def _json(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid JSON: {str(exc).splitlines()[0][:80]}"
    return None


def _safetensors(path: Path) -> str | None:
    """An 8-byte header length, a JSON header, then the tensors it describes, to the last byte."""
    size = path.stat().st_size
    with path.open("rb") as f:
        start = f.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else size
        if 8 + length > size:
            return "truncated: shorter than its header"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        return "not a safetensors file: unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and len(v.get("data_offsets", ())) == 2]
    if 8 + length + max(ends, default=0) > size:
        return "truncated: shorter than the tensors its header lists"
    return None


CHECKS = {".parquet": _parquet, ".json": _json, ".safetensors": _safetensors}


def check_files(folder: Path, redo: str = "") -> None:
    """Every Parquet, JSON and safetensors file directly in `folder` is whole (a killed copy or a full disk
    leaves them truncated); the error names the file and what to do (`redo`; default: re-run the command
    that makes the folder)."""
    if not folder.is_dir():
        return
    model = (folder / "config.json").exists() or (folder / METADATA_FILE).exists()
    for path in sorted(folder.iterdir()):
        check = CHECKS.get(path.suffix)
        problem = check(path) if check and path.is_file() else None
        if problem:
            if path.suffix == ".safetensors" and model:
                where = f"{folder}: unreadable model files ({path.name}: {problem})"
            else:
                kind = {".parquet": "Parquet part", ".json": "JSON file", ".safetensors": "safetensors file"}[path.suffix]
                where = f"{path}: unreadable {kind} ({problem})"
            raise PldistillError(f"{where}; {redo or _redo(folder)}")


def check_encoder_store(cache: Path) -> None:
    """The encoder store a teacher cache reads its encoder output from exists and its parts are whole."""
    try:
        store = json.loads((cache / "meta.json").read_text()).get("encoder", {}).get("store")
    except (OSError, ValueError, AttributeError):
        return  # check_files names a bad meta.json; a missing one is the cache's own error
    if store is None:
        return
    if not Path(store).is_dir():
        raise PldistillError(f"{store}: the encoder store the cache {cache} reads is gone; {_redo(cache)}")
    check_files(Path(store), f"delete {store} and {_redo(cache)}")


# ----------------------------------------------------------------------------------- settings vs. world


def teacher_config(teacher: Path) -> dict | None:
    """The teacher's LLM config (text_config of config.json; for a model kept as a reference to a
    checkpoint, the checkpoint's), or None where it is not on disk."""
    config = teacher / "config.json"
    if not config.exists() and (teacher / METADATA_FILE).exists():
        base = (json.loads((teacher / METADATA_FILE).read_text()).get("base") or {}).get("path")
        config = Path(base) / "config.json" if base else config
    if not config.exists():
        return None
    return json.loads(config.read_text()).get("text_config") or None


def check_cache_settings(teacher: Path, top_k: int, attention_layer: int | str, params_file: str = "params.yaml") -> None:
    """cache.top_k fits the teacher's vocabulary and cache.attention_layer its LLM layers: checked from the
    teacher's config.json before cache-teacher loads anything or writes anything."""
    config = teacher_config(teacher)
    if config is None:
        return
    vocab, layers = config.get("vocab_size"), config.get("num_hidden_layers")
    if vocab and top_k > vocab:
        raise PldistillError(f"{params_file}: cache.top_k {top_k} is larger than the teacher's vocabulary ({vocab} "
                             f"tokens, {teacher}); choose at most {vocab}")
    if layers and attention_layer != "mean" and not -layers <= attention_layer < layers:
        raise PldistillError(f"{params_file}: cache.attention_layer {attention_layer} is outside the teacher's {layers} "
                             f"LLM layers ({teacher}); choose -{layers}..{layers - 1} or mean")


def gpu_visible() -> bool | None:
    """False when this machine surely has no GPU torch could use (no NVIDIA, ROCm or WSL device file, or
    CUDA_VISIBLE_DEVICES hides every one); None when only torch can tell."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    dev = Path("/dev")
    if any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists() or (dev / "dxg").exists():
        return None
    return False


def check_device(device: str, setting: str) -> None:
    """`cuda` asked for (by `setting`) on a machine with no GPU is an error now, not after the imports."""
    if device == "cuda" and gpu_visible() is False:
        raise PldistillError(f"{setting}: device `cuda` requested but no CUDA GPU is visible; use --device cpu or auto")


def check_world_size(world_size: int, params_file: str = "params.yaml") -> None:
    """world_size (if set) is the number of processes the launcher started (torchrun and accelerate set
    WORLD_SIZE, MPI launchers their own count, read as accelerate reads them; a plain start is one)."""
    counts = (os.environ.get(k) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    started = int(next((c for c in counts if c), "1"))
    if world_size and started != world_size:
        raise PldistillError(
            f"{params_file}: world_size is {world_size} but {started} process(es) started; launch with "
            f"`torchrun --nproc-per-node {world_size} -m pldistill_cli ...` or set world_size: 0")


# --------------------------------------------------------------------------------------- export, predict


def check_export_destination(out: Path) -> None:
    """The destination is absent, an empty folder, or an earlier export (its pldistill.json says stage
    `export`); a path under a file, a file, or any other folder is refused: export never replaces what it
    did not write."""
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise PldistillError(f"{out}: {above} is a file, not a folder; choose another --out")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        earlier = json.loads((out / METADATA_FILE).read_text()).get("stage") == "export"
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise PldistillError(f"{out}: exists and is not an earlier pldistill export; export never replaces what it "
                             "did not write: choose another --out, or empty that folder yourself")


def expand_inputs(paths: list[Path]) -> list[Path]:
    """The files to label: a folder stands for every audio file under it (recursively, sorted, hidden ones
    skipped) and a glob pattern that is not itself a path (`'clips/*.wav'`, `'**/*.flac'`) for the files it
    matches, sorted; anything else (a file, a missing path, a folder or pattern with no audio) is kept as
    given, for the per-file checks to name."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif not path.exists() and glob.has_magic(str(path)):
            found = sorted(p for p in map(Path, glob.glob(str(path), recursive=True))
                           if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        else:
            found = []
        files += found or [path]
    return files


def unusable_input(path: Path) -> str | None:
    """Why a path that expand_inputs kept as given holds no audio file (None for a file)."""
    if path.is_dir():
        return "a folder with no audio files in it; pass audio files, or a folder that holds some (.wav, .flac, .mp3, ...)"
    if not path.exists() and glob.has_magic(str(path)):
        return "no audio file matches this pattern; check it, or pass the files or their folder"
    return None


class BadAudio(ValueError):
    """One unusable audio file; the caller reports and skips it."""


def audio_samples(path: Path | str):
    """Mono float32 samples (channels averaged) and their rate; BadAudio for a missing, corrupt, empty,
    non-finite or silent file (audio.read_audio resamples them)."""
    import numpy as np
    import soundfile as sf

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
    return wave, rate


def audio_problem(path: Path | str, min_seconds: float = MIN_SECONDS) -> str | None:
    """Why a model cannot label `path` (audio_samples's reasons, or shorter than `min_seconds`), or None."""
    try:
        wave, rate = audio_samples(path)
    except BadAudio as exc:
        return str(exc)
    if len(wave) < min_seconds * rate:
        return f"{len(wave) / rate:.3f} s is shorter than {min_seconds:g} s, the shortest clip the model was trained on"
    return None
