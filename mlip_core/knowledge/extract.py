"""Knowledge extraction from radiology reports: entity mentions with negation, uncertainty, side and location.

A rule-based labeller in the tradition of NegEx (Chapman et al., 2001) and the CheXpert labeller
(Irvin et al., 2019): one combined regular expression finds every surface form of every entity of the
knowledge graph (a character trie, so the cost does not grow with the number of synonyms), a second one
finds the negation / uncertainty triggers, and each trigger's scope is cut at clause boundaries.

    ex = KnowledgeExtractor()
    ex.mentions("No effusion or pneumothorax. Possible left basilar atelectasis.")
    ex.report_labels(text)                     # {"Atelectasis": -1.0, "Pleural Effusion": 0.0, ...}
    ex.encode(texts, tokenizer, max_length)    # input_ids, attention_mask, token_entity, token_status
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from mlip_core.knowledge.graph import CHEXPERT_14, KnowledgeGraph, normalize_term, plural_forms

STATUS_CODE: dict[str, int] = {"positive": 1, "negative": 0, "uncertain": -1}
NO_STATUS = -2

# ---------------------------------------------------------------------------- trigger lexicon
# pre: scope runs forward from the trigger; post: backward; bi: the whole clause around it.
# Longer phrases win over their parts ("cannot be excluded" is one uncertain trigger, not a negation).
_TRIGGERS: dict[str, list[str]] = {
    "pseudo": [
        "no change", "no interval change", "no significant change", "no significant interval change",
        "no substantial change", "no appreciable change", "no definite change", "without change",
        "without interval change", "without significant change", "not significantly changed", "not changed",
        "no increase", "no decrease", "not increased", "not decreased", "not only", "gram negative",
        "no longer be excluded", "if not", "whether or not", "to suggest", "to indicate", "to explain",
        "to account for", "to represent",
    ],
    "neg_pre": [
        "no", "not", "without", "negative for", "free of", "clear of", "absence of", "absent", "no evidence of",
        "no radiographic evidence of", "no sign of", "no signs of", "no findings of", "no finding of",
        "resolution of", "interval resolution of", "removal of", "interval removal of", "no longer", "never",
        "nor", "neither", "no definite", "no visible", "no acute", "no new", "no focal", "no residual",
        "no obvious", "no significant", "not definitely", "rather than", "resolved",
    ],
    "neg_post": [
        "has resolved", "have resolved", "had resolved", "is resolved", "are resolved", "resolved",
        "is absent", "are absent", "not seen", "not identified", "not visualized", "not visible",
        "not present", "not appreciated", "not demonstrated", "not evident", "not detected", "not noted",
        "no longer seen", "no longer visualized", "no longer present", "no longer identified",
        "no longer visible", "no longer evident", "no longer demonstrated", "has been removed",
        "have been removed", "been removed", "removed", "ruled out", "has cleared", "have cleared", "cleared",
        "not enlarged", "not dilated", "not widened", "within normal limits", "within limits of normal",
        "within the limits of normal", "is normal", "are normal", "appear normal", "appears normal",
        "is unremarkable", "are unremarkable",
    ],
    "unc_pre": [
        "possible", "possibly", "probable", "probably", "likely", "most likely", "questionable",
        "questionably", "question of", "suspicious for", "suspected", "suspect", "concerning for",
        "concern for", "may represent", "may reflect", "may be", "might represent", "might be",
        "could represent", "could reflect", "could be", "cannot exclude", "can not exclude", "cannot rule out",
        "can not rule out", "not exclude", "differential diagnosis includes", "differential includes",
        "differential considerations include", "consider", "considered", "suggestive of", "suggests",
        "suggesting", "suggest", "worrisome for", "evaluate for", "rule out", "r/o", "borderline", "equivocal",
        "indeterminate", "presumed", "presumably", "apparent", "apparently", "atypical for", "may have",
        "cannot be ruled out", "versus", "vs", "or possibly", "uncertain", "not entirely excluded",
        "is not excluded", "not excluded", "cannot be excluded", "can not be excluded", "question",
        "questioned",
        "could not be excluded", "not ruled out", "could not be ruled out", "can't exclude",
    ],
    "unc_post": [
        "cannot be excluded", "can not be excluded", "could not be excluded", "not excluded",
        "is not excluded", "are not excluded", "not entirely excluded", "not ruled out", "cannot be ruled out",
        "could not be ruled out", "is possible", "are possible", "is suspected", "are suspected",
        "is questioned", "is not entirely excluded", "is likely", "is probable", "versus", "vs",
        "may be present", "is questionable", "are questionable", "is favored", "are favored", "is considered",
        "not excluded", "is a consideration", "would be difficult to exclude", "difficult to exclude",
    ],
    "unc_bi": ["may", "might", "could", "versus", "vs", "or possibly"],
}
# The scope of a trigger ends at these words (and at ";", ":" and the sentence end).
_TERMINATORS = [
    "but", "however", "although", "though", "which", "whereas", "while", "except", "aside from",
    "apart from", "other than", "otherwise", "there is", "there are", "there has been", "there have been",
    "there appears", "there may", "is seen", "are seen", "is noted", "are noted", "is present", "are present",
    "is again", "are again", "remains", "remain", "persists", "persist", "given", "because",
]
# A list separator ("," / "and" / "or") keeps a negation going ("no effusion, focal consolidation, or
# pneumothorax") unless the words before the next mention start a new statement: a size or severity, a
# side, a determiner or a verb ("no pneumothorax, small left effusion").
_LIST_BREAK = {
    "small", "mild", "minimal", "moderate", "moderately", "mildly", "severe", "severely", "trace", "tiny", "slight",
    "slightly", "stable", "stably", "persistent", "persistently", "unchanged", "increased", "increasing",
    "decreased", "decreasing", "improved", "improving", "worsening", "worsened", "left", "right", "bilateral",
    "bibasilar", "the", "this", "these", "there", "which", "is", "are", "was", "were", "has", "have", "again",
    "chronic", "old", "healed", "prior", "calcified", "heart", "lungs", "lung", "status", "post", "s/p",
    "postoperative", "otherwise", "mild-to-moderate", "moderate-to-severe", "known", "redemonstrated",
}
_LIST_MAX_WORDS = 4
_SIDE_WORDS = {
    "left": "left", "right": "right", "bilateral": "bilateral", "bilaterally": "bilateral", "both": "bilateral",
    "bibasilar": "bilateral", "bibasal": "bilateral", "biapical": "bilateral", "left-sided": "left",
    "right-sided": "right",
}

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])(?<!\b[Dd]r\.)(?<!\bvs\.)(?<!\bNo\.)\s+)|\n\s*\n|(?:\s+-\s+|\s*\n\s*)(?=\d+\.\s)")
_SIDE_RE = re.compile(r"\b(?:" + "|".join(sorted((re.escape(w) for w in _SIDE_WORDS), key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:/[a-z]+)?")


def _phrase_regex(phrase: str) -> str:
    """Regex for a normalized phrase: spaces match any whitespace or hyphen run."""
    return r"[\s\-]+".join(re.escape(w) for w in phrase.split(" "))


def trie_regex(terms: Iterable[str]) -> str:
    """One regex alternation matching exactly ``terms`` (normalized, space = whitespace/hyphen), longest first.

    Built from a character trie so the regex engine follows one branch per character instead of trying
    every term at every position; ``(?:...)?`` groups are greedy, so the longest term is preferred and the
    engine backs off to a shorter one only when the word boundary after it fails.
    """
    trie: dict[str, Any] = {}
    for term in terms:
        node = trie
        for ch in term:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> tuple[str, int]:
        """(regex, depth) for a trie node; children with longer continuations are tried first."""
        ends = "" in node
        built = []
        for ch in (c for c in node if c != ""):
            sub, depth = build(node[ch])
            atom = r"[\s\-]+" if ch == " " else re.escape(ch)
            built.append((-(depth + 1), ch, atom + sub))
        if not built:
            return "", 0
        built.sort()
        branches = [b for _, _, b in built]
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return ("(?:" + body + ")?" if ends else body), -built[0][0]

    return build(trie)[0]


_MENTION_CACHE_SIZE = 200_000  # texts; a MIMIC-size report set's sentences fit


@dataclass(frozen=True)
class Mention:
    """One entity mention: character span [start, end) of the input text, assertion status, side and location."""

    entity_id: str
    start: int
    end: int
    text: str
    status: str  # "positive" | "negative" | "uncertain"
    side: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class _Trigger:
    kind: str
    start: int
    end: int


class KnowledgeExtractor:
    """Finds knowledge-graph entities in report text, with negation / uncertainty scope, side and location."""

    def __init__(self, graph: KnowledgeGraph | None = None) -> None:
        """Compile the entity and trigger regexes once for ``graph`` (default: the curated chest X-ray graph)."""
        self.graph = graph if graph is not None else _default_graph()
        forms: dict[str, str] = {}
        for ent in self.graph.entities:
            for syn in [ent.name, *ent.synonyms]:
                for form in plural_forms(normalize_term(syn)):
                    other = forms.setdefault(form, ent.id)
                    if other != ent.id and normalize_term(syn) == form:
                        # An explicit synonym beats a generated plural; two explicit ones are a data error.
                        if any(normalize_term(s) == form for s in self.graph.entity(other).synonyms + [
                                self.graph.entity(other).name]):
                            raise ValueError(f"surface form {form!r} belongs to both {other!r} and {ent.id!r}; "
                                             "fix the synonyms in the knowledge base")
                        forms[form] = ent.id
        self._forms = forms
        groups: list[str] = []
        self._group_entity: dict[str, tuple[str, str | None]] = {}
        gi = 0
        for ent in self.graph.entities:
            for kind, pats in (("negative", ent.negative_patterns), (None, ent.patterns)):
                for pat in pats:
                    try:
                        compiled = re.compile(pat, re.IGNORECASE)
                    except re.error as exc:
                        raise ValueError(f"entity {ent.id!r}: bad pattern {pat!r} ({exc})") from exc
                    if compiled.groups:
                        raise ValueError(f"entity {ent.id!r}: pattern {pat!r} must use only (?:...) groups")
                    name = f"g{gi}"
                    gi += 1
                    flexible = pat.replace(" ", r"[\s\-]+")  # a space in a pattern matches any whitespace run
                    groups.append(f"(?P<{name}>{flexible})")
                    self._group_entity[name] = (ent.id, kind)
        groups.append(f"(?P<lex>{trie_regex(forms)})")
        self._entity_re = re.compile(r"(?<!\w)(?:" + "|".join(groups) + r")(?![\w])", re.IGNORECASE)

        trig_forms: dict[str, list[str]] = {}
        for kind, phrases in _TRIGGERS.items():
            for p in phrases:
                trig_forms.setdefault(normalize_term(p), []).append(kind)
        self._trigger_kinds = trig_forms
        self._trigger_re = re.compile(r"(?<![\w/])(?:" + trie_regex(trig_forms) + r")(?![\w])", re.IGNORECASE)
        # Terminators: words, plus ';' ':' and list separators (handled separately below).
        self._term_re = re.compile(
            r";|:|\(|\)|(?<![\w])(?:" + "|".join(_phrase_regex(normalize_term(t)) for t in
                                          sorted(_TERMINATORS, key=len, reverse=True)) + r")(?![\w])",
            re.IGNORECASE)
        self._sep_re = re.compile(r",|(?<![\w])(?:and|or|nor|with|as well as)(?![\w])", re.IGNORECASE)

    # ------------------------------------------------------------------ mentions
    def mentions(self, text: str) -> list[Mention]:
        """All entity mentions in ``text`` (character spans into ``text``), in order of appearance."""
        if not isinstance(text, str):
            raise TypeError(f"mentions expects a report string, got {type(text).__name__}")
        # Pretraining asks again for the same reports every epoch and every run of a grid: the mentions of a
        # text never change (Mention is frozen), so they are looked up, not re-extracted.
        cache = self.__dict__.setdefault("_mention_cache", {})
        found = cache.get(text)
        if found is None:
            found = tuple(m for s0, s1 in self.sentence_spans(text) for m in self._sentence_mentions(text, s0, s1))
            if len(cache) >= _MENTION_CACHE_SIZE:
                cache.clear()
            cache[text] = found
        return list(found)

    @staticmethod
    def sentence_spans(text: str) -> list[tuple[int, int]]:
        """[start, end) character spans of the sentences of ``text``."""
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if m.start() > start:
                spans.append((start, m.start()))
            start = m.end()
        if start < len(text):
            spans.append((start, len(text)))
        return [(a, b) for a, b in spans if text[a:b].strip()]

    def _sentence_mentions(self, text: str, s0: int, s1: int) -> list[Mention]:
        sent = text[s0:s1]
        raw: list[tuple[str, int, int, str | None]] = []  # entity, start, end, forced status
        for m in self._entity_re.finditer(sent):
            group = m.lastgroup
            if group == "lex":
                eid = self._forms.get(normalize_term(m.group(0)))
                if eid is None:  # cannot happen: the trie holds exactly the forms
                    continue
                raw.append((eid, m.start(), m.end(), None))
            else:
                eid, kind = self._group_entity[group]
                raw.append((eid, m.start(), m.end(), kind))
        if not raw:
            return []
        triggers = self._triggers(sent)
        terms = [m.start() for m in self._term_re.finditer(sent)]
        seps = [(m.start(), m.end()) for m in self._sep_re.finditer(sent)]
        mention_starts = sorted(r[1] for r in raw)
        lower = sent.lower()

        def list_continues(sep_end: int) -> bool:
            """True when the text after a separator is only list-neutral words up to the next mention."""
            nxt = next((s for s in mention_starts if s >= sep_end), None)
            if nxt is None:
                return False
            words = _WORD.findall(lower[sep_end:nxt])
            return len(words) <= _LIST_MAX_WORDS and not any(w in _LIST_BREAK for w in words)

        def forward_end(start: int, stop_kinds: tuple[str, ...]) -> int:
            end = len(sent)
            for t in terms:
                if t > start:
                    end = min(end, t)
                    break
            for a, b in seps:
                if a > start and a < end and not list_continues(b):
                    end = a
                    break
            for tr in triggers:
                if tr.start > start and tr.kind.startswith(stop_kinds):
                    end = min(end, tr.start)
                    break
            return end

        def backward_start(end: int, stop_kinds: tuple[str, ...]) -> int:
            begin = 0
            for t in terms:
                if t < end:
                    begin = max(begin, t)
            # A conjunction list before a post-trigger is covered as a whole ("effusion and pneumothorax have
            # resolved"); a comma ends the scope ("small effusion, pneumothorax has resolved").
            for a, b in seps:
                if b <= end and (lower[a:b] not in ("and", "or", "nor") or not list_continues(b)):
                    begin = max(begin, b)
            for tr in triggers:
                if tr.end <= end and tr.kind.startswith(stop_kinds):
                    begin = max(begin, tr.end)
            return begin

        neg_scopes: list[tuple[int, int, int]] = []  # (scope start, scope end, trigger end)
        unc_scopes: list[tuple[int, int, int]] = []
        for tr in triggers:
            pol, direction = tr.kind.split("_")
            other = ("unc",) if pol == "neg" else ("neg",)
            bucket = neg_scopes if pol == "neg" else unc_scopes
            if direction == "pre":
                bucket.append((tr.start, forward_end(tr.start, other), tr.end))
            elif direction == "post":
                bucket.append((backward_start(tr.start, other), tr.start, -1))
            else:
                bucket.append((backward_start(tr.start, other), forward_end(tr.start, other), -1))

        def in_scope(scopes: list[tuple[int, int, int]], a: int, b: int) -> bool:
            for lo, hi, trig_end in scopes:
                # Overlap with the scope; a forward scope never reaches back before its trigger, but a trigger
                # inside the mention ("heart is not enlarged") counts.
                if a < hi and b > lo and (trig_end < 0 or b >= trig_end):
                    return True
            return False

        sides = [(m.start(), m.end(), _SIDE_WORDS[m.group(0).lower()]) for m in _SIDE_RE.finditer(sent)]
        anatomy = [(a, b, e) for e, a, b, _ in raw if self.graph.entity(e).category == "anatomy"]
        clause_cuts = sorted({0, len(sent), *terms, *(a for a, _ in seps)})

        out = []
        for eid, a, b, forced in raw:
            if forced == "negative":
                status = "negative"
            elif in_scope(neg_scopes, a, b):
                status = "negative"
            elif in_scope(unc_scopes, a, b):
                status = "uncertain"
            else:
                status = "positive"
            side, location = None, None
            if self.graph.entity(eid).category in ("finding", "device"):
                side, location = self._side_location(a, b, sides, anatomy, clause_cuts, eid)
            elif self.graph.entity(eid).category == "anatomy":
                side, _ = self._side_location(a, b, sides, [], clause_cuts, eid)
            out.append(Mention(eid, s0 + a, s0 + b, text[s0 + a:s0 + b], status, side, location))
        return out

    def _triggers(self, sent: str) -> list[_Trigger]:
        found = []
        for m in self._trigger_re.finditer(sent):
            kinds = self._trigger_kinds[normalize_term(m.group(0))]
            for kind in kinds:
                if kind != "pseudo":
                    found.append(_Trigger(kind, m.start(), m.end()))
        return found

    @staticmethod
    def _side_location(a: int, b: int, sides: list, anatomy: list, cuts: list[int],
                       eid: str) -> tuple[str | None, str | None]:
        """Nearest side word and anatomy mention in the clause around [a, b); words before the mention win ties."""
        lo = max((c for c in cuts if c <= a), default=0)
        hi = min((c for c in cuts if c >= b), default=cuts[-1])
        # Side words also reach across a following prepositional phrase ("effusion on the left").
        best_side, best_d = None, None
        for sa, sb, side in sides:
            if sa >= lo and sb <= hi:
                d = (a - sb) if sb <= a else (sa - b) + 0.5 if sa >= b else 0
                if best_d is None or d < best_d:
                    best_side, best_d = side, d
        best_loc, best_ld = None, None
        for aa, ab, aid in anatomy:
            if aa >= lo and ab <= hi and aid != eid and not (aa < b and ab > a):
                d = (a - ab) if ab <= a else (aa - b) + 0.5
                if best_ld is None or d < best_ld:
                    best_loc, best_ld = aid, d
        return best_side, best_loc

    # ------------------------------------------------------------------ report-level labels
    def report_labels(self, text: str) -> dict[str, float]:
        """CheXpert-convention labels keyed by CHEXPERT_14: 1 positive, 0 negative, -1 uncertain, NaN not mentioned.

        An observation is positive if any of its mentions is, else uncertain if any is, else negative if any
        is; "No Finding" is 1 when no observation other than Support Devices is positive or uncertain (NaN
        otherwise, and for an empty text every label is NaN).
        """
        if isinstance(text, bytes):  # non-UTF-8 bytes are decoded with U+FFFD, not a TypeError
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):  # a NaN / None report cell is an empty report, not an AttributeError
            text = ""
        return self.labels_from_mentions(self.mentions(text) if text and text.strip() else None)

    def labels_from_mentions(self, mentions: Sequence[Mention] | None) -> dict[str, float]:
        """CheXpert-convention labels from already extracted mentions (None = empty report: all NaN)."""
        labels = {name: math.nan for name in CHEXPERT_14}
        if mentions is None:
            return labels
        rank = {"negative": 0, "uncertain": 1, "positive": 2}
        value = {"negative": 0.0, "uncertain": -1.0, "positive": 1.0}
        best: dict[str, str] = {}
        for m in mentions:
            obs = self.graph.entity(m.entity_id).chexpert
            if not obs:
                continue
            if obs not in best or rank[m.status] > rank[best[obs]]:
                best[obs] = m.status
        for obs, status in best.items():
            labels[obs] = value[status]
        found = any(labels[o] in (1.0, -1.0) for o in CHEXPERT_14 if o not in ("No Finding", "Support Devices"))
        labels["No Finding"] = math.nan if found else 1.0
        return labels

    # ------------------------------------------------------------------ token spans
    def encode(self, texts: Sequence[str], tokenizer: Any, max_length: int,
               padding: str | bool = "max_length") -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` and mark entity tokens.

        Returns ``input_ids``, ``attention_mask``, ``token_entity`` (B, L) long: the index (in
        ``graph.entity_ids``) of the entity a token belongs to, -1 where none; and ``token_status`` (B, L) long:
        1 positive / 0 negative / -1 uncertain / -2 none. Needs a fast tokenizer (``offset_mapping``).
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a sequence of texts, not one string")
        texts = [t if isinstance(t, str) else "" for t in texts]
        enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding=padding,
                        return_offsets_mapping=True, return_tensors="np")
        offsets = enc["offset_mapping"]  # (B, L, 2)
        bsz, length = enc["input_ids"].shape
        token_entity = np.full((bsz, length), -1, dtype=np.int64)
        token_status = np.full((bsz, length), NO_STATUS, dtype=np.int64)
        special = np.zeros((bsz, length), dtype=bool)
        if "special_tokens_mask" in enc:
            special = enc["special_tokens_mask"].astype(bool)
        for i, text in enumerate(texts):
            spans = self.mentions(text)
            if not spans:
                continue
            char_ent = np.full(len(text) + 1, -1, dtype=np.int64)
            char_st = np.full(len(text) + 1, NO_STATUS, dtype=np.int64)
            for m in spans:
                char_ent[m.start:m.end] = self.graph.index(m.entity_id)
                char_st[m.start:m.end] = STATUS_CODE[m.status]
            st, en = offsets[i, :, 0], offsets[i, :, 1]
            real = (en > st) & ~special[i]
            idx = np.where(real)[0]
            token_entity[i, idx] = char_ent[st[idx]]
            token_status[i, idx] = char_st[st[idx]]
        return {
            "input_ids": torch.as_tensor(enc["input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(enc["attention_mask"], dtype=torch.long),
            "token_entity": torch.from_numpy(token_entity),
            "token_status": torch.from_numpy(token_status),
        }


@lru_cache(maxsize=1)
def _default_graph() -> KnowledgeGraph:
    return KnowledgeGraph.load_default()


@lru_cache(maxsize=1)
def default_extractor() -> KnowledgeExtractor:
    """A shared extractor over the default graph (regexes compiled once per process)."""
    return KnowledgeExtractor()
