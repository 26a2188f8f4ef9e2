"""IEMOCAP (Busso et al., 2008), release layout: Session<k>/sentences/wav/<dialog>/<utt>.wav with the labels
in Session<k>/dialog/EmoEvaluation/<dialog>.txt.

Folds: fold k tests Session k (EmoBox's session-wise folds); validation by `previous_fold`."""

from __future__ import annotations

import re
from collections import Counter

from ..config import CorpusParams, Params
from ..errors import PldistillError
from ..layout import Layout
from .base import Advance, Collected, Corpus, SourceItem, _nothing_found, _root, _walk, previous_fold

LABELS = ("Happy", "Sad", "Angry", "Neutral")  # in the order the prompt lists them
# As EmoBox and the paper use IEMOCAP: exc is merged into Happy; the other release labels are left out.
CODES = {"neu": "Neutral", "hap": "Happy", "exc": "Happy", "ang": "Angry", "sad": "Sad"}
LEFT_OUT = ("xxx", "fru", "sur", "fea", "dis", "oth")
SESSIONS = 5  # fold k tests Session k

_LINE = re.compile(r"\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(Ses\d\d[FM]_\S+)\s+(\S+)\s+\[")


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
                    m = _LINE.match(line)
                    if m:
                        labels.setdefault(m[1], m[2])
            wavs = {p.stem: p for p in _walk(session / "sentences" / "wav") if p.suffix.lower() == ".wav"}
            for _ in wavs:
                advance()
            excluded["no label"] += len(wavs.keys() - labels.keys())
            for utt, code in sorted(labels.items()):
                if code in LEFT_OUT:
                    excluded[f"label {code} (left out)"] += 1
                elif code not in CODES:
                    raise PldistillError(f"{session / 'dialog' / 'EmoEvaluation'}: {utt} has label {code!r}, not an "
                                         f"IEMOCAP release code ({', '.join([*CODES, *LEFT_OUT])}); "
                                         "fix the label file")
                elif utt not in wavs:
                    excluded["no audio file"] += 1
                else:
                    speaker = utt[:5] + utt.rsplit("_", 1)[1][0]  # Ses01F_impro01_M003 -> Ses01M
                    items.append(SourceItem(f"iemocap-{utt}", speaker, CODES[code], wavs[utt], fold,
                                            previous_fold(fold, SESSIONS)))
        excluded = Counter({r: n for r, n in excluded.items() if n})
        if not items:
            raise _nothing_found(root, "labelled IEMOCAP utterances (Session*/sentences/wav + EmoEvaluation)", excluded)
        return Collected(items, LABELS, dict(excluded))


CORPUS = Corpus(
    name="iemocap",
    labels=LABELS,
    licence="IEMOCAP (Busso et al., 2008), under the USC SAIL licence agreement: research use only",
    hub_licence="other",
    description="IEMOCAP: acted English dialogues, 10 speakers",
    headline=("UA", 83.91),
    adapter=IemocapAdapter(),
)
