"""Adapters for real corpora: RAVDESS, SAVEE and IEMOCAP as distributed, any corpus described by
EmoBox fold files (`emobox`), and the user's own data (`folder`: label folders or a CSV).

Every adapter returns SourceItems whose `fold` is the fold whose test split holds the utterance and
whose `validation_fold` (never `fold`) is the fold whose validation split holds it. Files left out
by design are counted in `Collected.excluded` by reason; input the adapter cannot make sense of is
a one-line PldistillError naming the file and what to do.

Folds and validation
- RAVDESS, SAVEE, IEMOCAP: EmoBox's speaker-/session-wise test folds (below); validation by
  `previous_fold` (the utterances tested in fold k+1 validate fold k), so validation speakers come
  from fold k's training side.
- emobox: fold K = the fold file `fold_K/<corpus>_test_fold_K.jsonl` that lists the utterance.
  Validation: official `fold_K/<corpus>_valid_fold_K.jsonl` files where they exist (an utterance
  listed for several folds keeps the first); for utterances no validation file lists (or when there
  are none) the general rule below.
- folder: a CSV `fold` column if present; else speakers dealt round-robin into
  min(n_folds, #speakers) folds after a seeded shuffle (needs >= 3 speakers); else files dealt into
  n_folds folds stratified by label. Validation by the general rule.
- General rule: if every speaker is known and sits in a single fold, `previous_fold`
  (speaker_independent=True); otherwise a stratified carve: for each (fold, label) group the
  utterances are shuffled (numpy default_rng(params.seed)) and dealt round-robin, from a random
  start, over the other folds (speaker_independent=False). Either way there must be >= 3 folds,
  numbered 1..n, or some fold would have no training data.

EmoBox re-rooting rule for a line's `wav` (e.g. `downloads/ravdess/audio/Actor_01/x.wav`): the first
existing file of (1) root / the path with `downloads/<dataset>/` stripped (<dataset> = the line's
`dataset` field) -> root/audio/Actor_01/x.wav, (2) root / the path with only `downloads/` stripped,
(3) root / the path as given; an absolute path is used as is. If no line's audio is found the root
is wrong (error); otherwise the missing ones are listed (Collected.missing).
"""

from __future__ import annotations

import csv as _csvlib
import dataclasses
import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..inputs import AUDIO_SUFFIXES
from ..labels import IEMOCAP_CODES, IEMOCAP_LEFT_OUT, LABEL_SETS, RAVDESS_CODES, SAVEE_CODES
from ..layout import Layout
from . import Collected, SourceItem, previous_fold

UNKNOWN = "unknown"  # the speaker of an utterance whose speaker is not known
RAVDESS_FOLDS = {1: (1, 11, 20, 21), 2: (4, 10, 12, 14), 3: (8, 9, 19, 23), 4: (3, 5, 7, 24),
                 5: (2, 15, 16, 18), 6: (6, 13, 17, 22)}  # EmoBox's test actors per fold
SAVEE_FOLDS = {"JE": 1, "KL": 2, "DC": 3, "JK": 4}  # EmoBox's test speaker -> fold
IEMOCAP_SESSIONS = 5  # fold k tests Session k

_RAVDESS_FOLD = {actor: fold for fold, actors in RAVDESS_FOLDS.items() for actor in actors}
_RAVDESS_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")
_SAVEE_CODE = r"(sa|su|a|d|f|h|n)(\d\d)"
_SAVEE_FLAT = re.compile(rf"({'|'.join(SAVEE_FOLDS)})_{_SAVEE_CODE}")
_IEMOCAP_LINE = re.compile(r"\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(Ses\d\d[FM]_\S+)\s+(\S+)\s+\[")
_LABEL_WORD = re.compile(r"[^\s,\[\](){}]+(?: [^\s,\[\](){}]+)*")  # words separated by single spaces
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")

Advance = Callable[[], None]


# ------------------------------------------------------------------------------------------ shared


def _root(dataset: str, corpus: CorpusParams) -> Path:
    if corpus.root is None:
        raise PldistillError(f"{dataset}: no corpus root; pass --root PATH or set corpora.{dataset}.root in params.yaml")
    return Path(corpus.root)


def _walk(folder: Path) -> list[Path]:
    """Every file under `folder`, recursively and sorted, skipping hidden files and folders (`._x.wav`)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _nothing_found(where: Path, what: str, excluded: Counter) -> PldistillError:
    left_out = f" (left out: {', '.join(f'{r} {n}' for r, n in excluded.items())})" if excluded else ""
    return PldistillError(f"{where}: no recognisable {what} found{left_out}; pass the folder that holds the corpus")


def _check_label(label: str, where: object) -> str:
    if not _LABEL_WORD.fullmatch(label):
        raise PldistillError(f"{where}: label {label!r} is not usable as a label word (the prompt lists labels as "
                             "[A, B, C]: no commas, brackets, tabs, newlines or outer spaces); rename it")
    return label


def _speaker(pattern: re.Pattern | None, *texts: str) -> str:
    """The first group (or the whole match) of `pattern` in the first text it matches; UNKNOWN without one."""
    if pattern is None:
        return UNKNOWN
    for text in texts:
        m = pattern.search(text)
        if m and (m.group(1) if pattern.groups else m.group(0)):
            return m.group(1) if pattern.groups else m.group(0)
    raise PldistillError(f"{texts[-1]}: speaker_pattern {pattern.pattern!r} does not match it; fix the pattern")


def _compile(pattern: str | None, dataset: str) -> re.Pattern | None:
    try:
        return re.compile(pattern) if pattern else None
    except re.error as exc:
        raise PldistillError(f"params.yaml: corpora.{dataset}.speaker_pattern is not a valid regex ({exc})") from None


def _unique_ids(pairs: list[tuple[str, str]]) -> list[str]:
    """File-name-safe utterance ids from (wanted id, unique source); clashes get a hash of the source."""
    safe = [_UNSAFE_ID.sub("_", wanted) for wanted, _ in pairs]
    counts = Counter(safe)
    return [s if counts[s] == 1 else f"{s}-{hashlib.sha1(src.encode()).hexdigest()[:8]}"
            for s, (_, src) in zip(safe, pairs)]


def _check_folds(folds: Iterable[int], where: object) -> int:
    folds = sorted(set(folds))
    if len(folds) < 3 or folds != list(range(1, len(folds) + 1)):
        raise PldistillError(f"{where}: folds {folds} must be numbered 1..n with n >= 3 (a test, a validation "
                             "and a training fold each time); fix the fold assignment")
    return len(folds)


def _deal(groups: dict, targets: Callable[[object], list[int]], rng: np.random.Generator) -> dict[str, int]:
    """For each group (sorted) of ids: shuffle, then deal round-robin over targets(group) from a random start."""
    out = {}
    for group, ids in sorted(groups.items()):
        slots = targets(group)
        ids, start = sorted(ids), int(rng.integers(len(slots)))
        for i, j in enumerate(rng.permutation(len(ids))):
            out[ids[j]] = slots[(start + i) % len(slots)]
    return out


def _with_validation(items: list[SourceItem], n_folds: int, rng: np.random.Generator) -> list[SourceItem]:
    """The general validation rule (module docstring): speaker-wise when every speaker is known and
    in one fold, else a stratified carve over the other folds."""
    folds_of = defaultdict(set)
    for item in items:
        folds_of[item.speaker].add(item.fold)
    if UNKNOWN not in folds_of and all(len(f) == 1 for f in folds_of.values()):
        return [dataclasses.replace(i, validation_fold=previous_fold(i.fold, n_folds), speaker_independent=True)
                for i in items]
    groups = defaultdict(list)
    for item in items:
        groups[(item.fold, item.label)].append(item.utt_id)
    others = lambda group: [f for f in range(1, n_folds + 1) if f != group[0]]  # noqa: E731
    carved = _deal(groups, others, rng)
    return [dataclasses.replace(i, validation_fold=carved[i.utt_id], speaker_independent=False) for i in items]


def _missing_audio(where: Path, first: str, rule: str) -> PldistillError:
    return PldistillError(f"{where}: none of the listed audio files was found (first: {first}); {rule}")


# ----------------------------------------------------------------------------------- built-in corpora


def _scan_names(root: Path, suffixes: tuple[str, ...], advance: Advance, n_folds: int,
                parse: Callable[[Path], "tuple[str, str, str, int] | str"]) -> tuple[list[SourceItem], Counter]:
    """Corpora whose file names say everything: `parse` turns a file into (utt_id, speaker, label,
    fold), or into the reason it is left out; repeated names are counted, validation is previous_fold."""
    found: dict[str, SourceItem] = {}
    excluded: Counter = Counter()
    for path in _walk(root):
        if path.suffix.lower() not in suffixes:
            continue
        advance()
        parsed = parse(path)
        if isinstance(parsed, str):
            excluded[parsed] += 1
        elif parsed[0] in found:
            excluded["duplicate file name"] += 1
        else:
            utt_id, speaker, label, fold = parsed
            found[utt_id] = SourceItem(utt_id, speaker, label, path, fold, previous_fold(fold, n_folds))
    return list(found.values()), excluded


class RavdessAdapter:
    """RAVDESS speech as distributed (Actor_XX folders, flat, or the zip's nesting): audio-only
    speech (modality 03, vocal channel 01), 1440 clips in 6 folds of 4 actors."""

    name = "ravdess"

    @staticmethod
    def _parse(path: Path) -> tuple[str, str, str, int] | str:
        m = _RAVDESS_NAME.fullmatch(path.stem)
        if not m or m[1] not in ("01", "02", "03") or m[2] not in ("01", "02"):
            return "unrecognised name"
        modality, vocal, emotion, *_, actor = m.groups()
        if modality != "03":
            return "video (modality 01/02)"
        if vocal != "01":
            return "song (vocal channel 02)"
        if emotion not in RAVDESS_CODES:
            raise PldistillError(f"{path}: emotion code {emotion} is not a RAVDESS code (01-08); remove the file")
        if int(actor) not in _RAVDESS_FOLD:
            raise PldistillError(f"{path}: actor {actor} is not a RAVDESS actor (01-24); remove the file")
        return f"ravdess-{path.stem}", f"Actor_{actor}", RAVDESS_CODES[emotion], _RAVDESS_FOLD[int(actor)]

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        # the corpus's audio and video files (video is counted as left out)
        items, excluded = _scan_names(root, (".wav", ".mp4"), advance, len(RAVDESS_FOLDS), self._parse)
        if not items:
            raise _nothing_found(root, "RAVDESS speech files (03-01-EE-II-SS-RR-AA.wav)", excluded)
        return Collected(items, LABEL_SETS["ravdess"], dict(excluded))


class SaveeAdapter:
    """SAVEE as distributed: AudioData/<speaker>/<code><nn>.wav (or the speaker folders directly
    under root) or flat <speaker>_<code><nn>.wav; 480 clips, one test speaker per fold."""

    name = "savee"

    @staticmethod
    def _parse(path: Path) -> tuple[str, str, str, int] | str:
        flat = _SAVEE_FLAT.fullmatch(path.stem)
        nested = re.fullmatch(_SAVEE_CODE, path.stem) if path.parent.name in SAVEE_FOLDS else None
        if flat:
            speaker, code, number = flat.groups()
        elif nested:
            speaker, (code, number) = path.parent.name, nested.groups()
        else:
            return "unrecognised name"
        return f"savee-{speaker}-{code}{number}", speaker, SAVEE_CODES[code], SAVEE_FOLDS[speaker]

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        items, excluded = _scan_names(root, (".wav",), advance, len(SAVEE_FOLDS), self._parse)
        if not items:
            raise _nothing_found(root, "SAVEE files (AudioData/DC/a01.wav or DC_a01.wav)", excluded)
        return Collected(items, LABEL_SETS["savee"], dict(excluded))


class IemocapAdapter:
    """IEMOCAP release layout: Session<k>/sentences/wav/<dialog>/<utt>.wav with the labels in
    Session<k>/dialog/EmoEvaluation/<dialog>.txt; neu, hap+exc, ang, sad; fold k tests Session k."""

    name = "iemocap"

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        sessions = sorted(d for d in root.glob("Session[1-5]") if d.is_dir())
        if not sessions:
            raise PldistillError(f"{root}: no Session1..Session5 folders; pass the IEMOCAP release folder "
                                 "(IEMOCAP_full_release) as the root")
        items: list[SourceItem] = []
        excluded: Counter = Counter()
        for session in sessions:
            fold = int(session.name[-1])
            labels: dict[str, str] = {}  # utterance -> raw code, first label line wins
            # only the files directly in EmoEvaluation/: its sub-folders hold the raw per-annotator files
            for txt in sorted((session / "dialog" / "EmoEvaluation").glob("[!.]*.txt")):
                advance()
                for line in txt.read_text(errors="replace").splitlines():
                    m = _IEMOCAP_LINE.match(line)
                    if m:
                        labels.setdefault(m[1], m[2])
            wavs = {p.stem: p for p in _walk(session / "sentences" / "wav") if p.suffix.lower() == ".wav"}
            for _ in wavs:
                advance()
            excluded["no label"] += len(wavs.keys() - labels.keys())
            for utt, code in sorted(labels.items()):
                if code in IEMOCAP_LEFT_OUT:
                    excluded[f"label {code} (left out)"] += 1
                elif code not in IEMOCAP_CODES:
                    raise PldistillError(f"{session / 'dialog' / 'EmoEvaluation'}: {utt} has label {code!r}, not an "
                                         f"IEMOCAP release code ({', '.join([*IEMOCAP_CODES, *IEMOCAP_LEFT_OUT])}); "
                                         "fix the label file")
                elif utt not in wavs:
                    excluded["no audio file"] += 1
                else:
                    speaker = utt[:5] + utt.rsplit("_", 1)[1][0]  # Ses01F_impro01_M003 -> Ses01M
                    items.append(SourceItem(f"iemocap-{utt}", speaker, IEMOCAP_CODES[code], wavs[utt], fold,
                                            previous_fold(fold, IEMOCAP_SESSIONS)))
        excluded = Counter({r: n for r, n in excluded.items() if n})
        if not items:
            raise _nothing_found(root, "labelled IEMOCAP utterances (Session*/sentences/wav + EmoEvaluation)", excluded)
        return Collected(items, LABEL_SETS["iemocap"], dict(excluded))


# ------------------------------------------------------------------------------------------- emobox


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PldistillError(f"{path}:{n}: not a JSON line; fix or re-download the EmoBox file") from None
        if not isinstance(row, dict) or not {"key", "wav", "emo"} <= row.keys():
            raise PldistillError(f"{path}:{n}: an EmoBox line needs the fields key, wav and emo")
        yield f"{path}:{n}", row


def _fold_files(meta: Path, split: str) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in sorted(meta.glob(f"fold_*/*_{split}_fold_*.jsonl")):
        m = re.search(rf"_{split}_fold_(\d+)\.jsonl$", path.name)
        if not m or path.parent.name != f"fold_{m[1]}":
            continue
        if int(m[1]) in files:
            raise PldistillError(f"{path}: a second {split} file for fold {m[1]} (also {files[int(m[1])]}); keep one")
        files[int(m[1])] = path
    return files


def _reroot(root: Path, wav: str, dataset: str) -> Path | None:
    """The audio file of an EmoBox `wav` path under `root` (rule in the module docstring), or None."""
    if Path(wav).is_absolute():
        return Path(wav) if Path(wav).is_file() else None
    parts = PurePosixPath(wav.replace("\\", "/")).parts
    candidates = [parts[2:]] if parts[:2] == ("downloads", dataset) else []
    candidates += [parts[1:]] if parts[:1] == ("downloads",) else []
    return next((root.joinpath(*c) for c in [*candidates, parts] if root.joinpath(*c).is_file()), None)


class EmoboxAdapter:
    """Any corpus described by EmoBox files: corpus.metadata = one corpus's folder (fold_K/ and
    label_map.json), corpus.root = its audio root."""

    name = "emobox"

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        root = _root(dataset, corpus)
        if not corpus.metadata or not Path(corpus.metadata).is_dir():
            raise PldistillError(f"{corpus.metadata or dataset}: the emobox adapter needs corpora.{dataset}.metadata, "
                                 "the EmoBox folder of one corpus (fold_K/*.jsonl and label_map.json)")
        meta = Path(corpus.metadata)
        label_map = self._label_map(meta / "label_map.json")
        tests = _fold_files(meta, "test")
        if not tests:
            raise PldistillError(f"{meta}: no fold_K/<corpus>_test_fold_K.jsonl files; pass the EmoBox folder of one corpus")
        n_folds = _check_folds(tests, meta)
        pattern = _compile(corpus.speaker_pattern, dataset)
        rule = (f"the wav paths are looked up under {root} with `downloads/<dataset>/` stripped, then with "
                "`downloads/` stripped, then as given; pass the folder that holds the corpus's audio as --root")

        found: dict[str, SourceItem] = {}  # EmoBox key -> item
        listed: dict[str, str] = {}  # every test key -> where it is listed
        missing: list[str] = []
        for fold, path in sorted(tests.items()):
            for where, row in _jsonl(path):
                advance()
                key, emo = str(row["key"]), str(row["emo"])
                if key in listed:
                    raise PldistillError(f"{where}: {key} is already listed at {listed[key]}; each utterance "
                                         "belongs to one test fold")
                listed[key] = where
                if emo not in label_map:
                    raise PldistillError(f"{where}: emo {emo!r} is not in {meta / 'label_map.json'}; add it there")
                audio = _reroot(root, str(row["wav"]), str(row.get("dataset") or path.name.split("_test_fold_")[0]))
                if audio is None:
                    missing.append(str(row["wav"]))
                    continue
                speaker = _speaker(pattern, key, str(row["wav"]))
                found[key] = SourceItem(key, speaker, label_map[emo], audio, fold, 0)
        if not found:
            raise _missing_audio(root, missing[0], rule) if missing else _nothing_found(meta, "EmoBox lines", Counter())
        ids = dict(zip(found, _unique_ids([(k, k) for k in found])))
        found = {k: dataclasses.replace(item, utt_id=ids[k]) for k, item in found.items()}

        official: dict[str, int] = {}
        repeated = 0
        for fold, path in sorted(_fold_files(meta, "valid").items()):
            for where, row in _jsonl(path):
                key = str(row["key"])
                if key not in listed:
                    raise PldistillError(f"{where}: {key} is in no test file; fix the validation file")
                if key in found and found[key].fold == fold:
                    raise PldistillError(f"{where}: {key} is in the test split of fold {fold} too; fix the validation file")
                repeated += key in official
                official.setdefault(key, fold)
        if repeated:
            from ..ui import console

            console.print(f"[yellow]note[/] {meta}: {repeated} utterances are listed in several validation files; "
                          "each keeps the first fold that lists it")
        rng = np.random.default_rng(params.seed)
        rest = _with_validation([i for k, i in found.items() if k not in official], n_folds, rng)
        items = [dataclasses.replace(i, validation_fold=official[k]) for k, i in found.items() if k in official] + rest
        return Collected(items, tuple(dict.fromkeys(label_map.values())), {}, [str(root / m) for m in missing])

    @staticmethod
    def _label_map(path: Path) -> dict[str, str]:
        try:
            label_map = json.loads(path.read_text())
        except FileNotFoundError:
            raise PldistillError(f"{path}: label map not found; the EmoBox folder needs label_map.json") from None
        except json.JSONDecodeError as exc:
            raise PldistillError(f"{path}: not valid JSON ({exc}); fix the label map") from None
        if not isinstance(label_map, dict) or not label_map or not all(isinstance(v, str) for v in label_map.values()):
            raise PldistillError(f"{path}: must map raw emotion codes to label words, e.g. {{\"exc\": \"Happy\"}}")
        for label in label_map.values():
            _check_label(label, path)
        return {str(k): v for k, v in label_map.items()}


# ------------------------------------------------------------------------------------------- folder


class FolderAdapter:
    """The user's own data: corpus.root with one sub-folder per label word, or corpus.csv with columns
    path, label and optional speaker, fold (paths relative to the CSV's folder or to root, or absolute)."""

    name = "folder"

    def collect(self, dataset: str, corpus: CorpusParams, params: Params, layout: Layout,
                advance: Advance) -> Collected:
        excluded: Counter = Counter()
        missing: list[str] = []
        rows = self._csv(dataset, corpus, advance, missing, excluded) if corpus.csv else \
            self._label_folders(dataset, corpus, advance, excluded)
        pattern = _compile(corpus.speaker_pattern, dataset)
        ids = _unique_ids([(f"{dataset}-{rel}", str(path)) for rel, path, *_ in rows])
        items = [SourceItem(utt_id, speaker or _speaker(pattern, path.name, rel), label, path, fold or 0, 0)
                 for utt_id, (rel, path, label, speaker, fold) in zip(ids, rows)]
        rng = np.random.default_rng(params.seed)
        where = corpus.csv or corpus.root
        if any(i.fold for i in items):
            n_folds = _check_folds((i.fold for i in items), where)
        else:
            if corpus.n_folds < 3:
                raise PldistillError(f"params.yaml: corpora.{dataset}.n_folds ({corpus.n_folds}) must be at least 3")
            speakers = sorted({i.speaker for i in items} - {UNKNOWN})
            if len(speakers) >= 3 and all(i.speaker != UNKNOWN for i in items):
                n_folds = min(corpus.n_folds, len(speakers))
                order = [speakers[j] for j in rng.permutation(len(speakers))]
                fold_of = {s: k % n_folds + 1 for k, s in enumerate(order)}
                items = [dataclasses.replace(i, fold=fold_of[i.speaker]) for i in items]
            else:
                n_folds = corpus.n_folds
                groups = defaultdict(list)
                for i in items:
                    groups[i.label].append(i.utt_id)
                fold_of = _deal(groups, lambda _: list(range(1, n_folds + 1)), rng)
                items = [dataclasses.replace(i, fold=fold_of[i.utt_id]) for i in items]
            _check_folds((i.fold for i in items), f"{where} ({len(items)} files)")
        items = _with_validation(items, n_folds, rng)
        return Collected(items, tuple(sorted({i.label for i in items})), dict(excluded), missing)

    def check(self, dataset: str, corpus: CorpusParams) -> None:
        """A CSV's format and rows (the audio files it lists are read later)."""
        if corpus.csv:
            self._csv(dataset, corpus, lambda: None, [], Counter())

    @staticmethod
    def _label_folders(dataset: str, corpus: CorpusParams, advance: Advance, excluded: Counter) -> list[tuple]:
        root = _root(dataset, corpus)
        rows = []
        for path in _walk(root):
            advance()
            rel = path.relative_to(root)
            if len(rel.parts) == 1:
                excluded["file outside a label folder"] += 1
            elif path.suffix.lower() not in AUDIO_SUFFIXES:
                excluded["not an audio file"] += 1
            else:
                rows.append((rel.with_suffix("").as_posix(), path, _check_label(rel.parts[0], root / rel.parts[0]),
                             None, None))
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if not any(label == folder.name for _, _, label, *_ in rows):
                raise PldistillError(f"{folder}: label folder holds no audio files; add audio or remove the folder")
        if not rows:
            raise _nothing_found(root, "label folders with audio (ROOT/<label>/<file>.wav)", excluded)
        return rows

    @staticmethod
    def _csv(dataset: str, corpus: CorpusParams, advance: Advance, missing: list[str], excluded: Counter) -> list[tuple]:
        """Rows of the CSV; listed files that do not exist go to `missing` (as looked up next to the CSV). A row
        repeated exactly is kept once (counted as a duplicate file, like the same file under another path);
        the same path listed again with another label, speaker or fold is an error naming both lines."""
        root = Path(corpus.root) if corpus.root else None
        csv = Path(corpus.csv)
        if not csv.is_file() and root is not None and (root / csv).is_file():
            csv = root / csv
        if not csv.is_file():
            raise PldistillError(f"{corpus.csv}: CSV not found; set corpora.{dataset}.csv to a file with columns path,label")
        try:  # the csv module, not pandas: this runs before the audio is touched, and must be quick
            with csv.open(newline="", encoding="utf-8-sig") as f:
                reader = _csvlib.reader(f, skipinitialspace=True)
                lines = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
        except (_csvlib.Error, UnicodeDecodeError) as exc:
            raise PldistillError(f"{csv}: unreadable CSV ({str(exc).splitlines()[0]})") from None
        if not lines:
            raise PldistillError(f"{csv}: empty CSV; list the audio files with columns path,label")
        columns = [c.strip().lower() for c in lines[0][1]]
        if not {"path", "label"} <= set(columns):
            raise PldistillError(f"{csv}: needs the columns path and label (optional speaker, fold); found {columns}")
        rows, seen = [], {}
        for n, cells in lines[1:]:
            advance()
            if len(cells) > len(columns):
                raise PldistillError(f"{csv}:{n}: {len(cells)} fields, but the header names {len(columns)}; fix the CSV")
            row = dict(zip(columns, cells + [""] * (len(columns) - len(cells))))
            where = f"{csv}:{n}"
            rel = row["path"].strip()
            if not rel:
                raise PldistillError(f"{where}: empty path; fix the CSV")
            entry = {k: v.strip() for k, v in row.items()}
            if rel in seen:
                line, first = seen[rel]
                other = next((k for k in entry if entry[k] != first[k]), None)
                if other:
                    raise PldistillError(f"{where}: {rel} is listed at line {line} with {other} {first[other]!r} and "
                                         f"here with {other} {entry[other]!r}; keep one row")
                excluded["duplicate (file)"] += 1
                continue
            seen[rel] = (n, entry)
            candidates = [Path(rel)] if Path(rel).is_absolute() else [csv.parent / rel] + ([root / rel] if root else [])
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                missing.append(str(candidates[0]))
                continue
            speaker = row["speaker"].strip() if "speaker" in columns else None
            if speaker == "":
                raise PldistillError(f"{where}: empty speaker; fill it in or drop the speaker column")
            fold = row["fold"].strip() if "fold" in columns else None
            if fold is not None and not (fold.isdigit() and int(fold) >= 1):
                raise PldistillError(f"{where}: fold {fold!r} is not a fold number (1, 2, ...); fix the CSV")
            label = _check_label(row["label"].strip(), where)
            rows.append((str(PurePosixPath(rel.replace("\\", "/")).with_suffix("")), path, label, speaker,
                         int(fold) if fold is not None else None))
        if not rows:
            if missing:
                raise _missing_audio(csv, missing[0], f"paths are looked up relative to {csv.parent}, then to the "
                                     "root; pass the audio folder as --root")
            raise PldistillError(f"{csv}: no rows; list the audio files with columns path,label")
        return rows


ADAPTERS = (RavdessAdapter, SaveeAdapter, IemocapAdapter, EmoboxAdapter, FolderAdapter)
