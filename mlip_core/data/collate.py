"""Batches for pretraining: dataset items -> the tensors :class:`mlip_core.model.mlip.MLIP` reads.

    collate = PretrainCollator(tokenizer, KnowledgeExtractor(), max_length=128, swap_prob=0.5)
    loader = DataLoader(MimicPretrainDataset(...), batch_size=48, collate_fn=collate)

Items are dicts ``{"image": (1,H,W), "text": str, "labels": (14,), "study_id": int, "index": int}``
(see ``mlip_core/data/mimic.py``). The batch holds ``image`` (B,1,H,W), ``input_ids``,
``attention_mask``, ``token_entity``, ``token_status`` (B,L), ``labels`` (B,14) (CheXpert convention,
NaN for blank), ``study_id``, ``index`` (B,) and, when ``swap_prob > 0``, the text-swap pairs
``swap_input_ids``, ``swap_attention_mask`` (B,L') and ``swap_label`` (B,) with 1 = report altered; with
``word_index`` the (B,L) word of each token; items that carry their report already tokenised
(:meth:`PretrainCollator.encode_all`) are stacked, not tokenised again; items that carry a frozen text tower's
precomputed outputs
(``text_tokens``, ``text_sentence``, ``text_cls_attention``) have them stacked, and items that carry their
text-swap pair already encoded (``swap_text_tokens``, ``swap_attention_mask``, ``swap_label``: see
:class:`mlip_core.train.TextFeatureDataset`) have those stacked instead of swapping and tokenising here; items
that carry the image tower's frozen-stage activations instead of an image (``trunk``, ``trunk_fmap``: see
:class:`mlip_core.train.TrunkFeatureDataset`) give those in place of ``image``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:  # the shared report cleaner and sentence splitter, when present
    from mlip_core.data.reports import split_sentences
except ImportError:  # pragma: no cover - reports.py ships with the package
    import re

    _SENT = re.compile(r"(?<=[.!?])\s+")

    def split_sentences(text: str) -> list[str]:
        """Sentences of a report (a small regex splitter)."""
        return [s.strip() for s in _SENT.split(text or "") if s.strip()]


PRECOMPUTED_TEXT_KEYS = ("text_tokens", "text_sentence", "text_cls_attention")
PRECOMPUTED_SWAP_KEYS = ("swap_text_tokens", "swap_attention_mask", "swap_label")
PRECOMPUTED_TOKEN_KEYS = ("input_ids", "attention_mask", "token_entity", "token_status")
TRUNK_KEYS = ("trunk", "trunk_fmap")  # items of mlip_core.train.TrunkFeatureDataset, in place of "image"


def _norm(sentence: str) -> str:
    return " ".join(sentence.lower().strip(" .").split())


class PretrainCollator:
    """Stack images and labels, tokenise reports with entity tokens, and build text-swap pairs.

    ``extractor``: a :class:`mlip_core.knowledge.extract.KnowledgeExtractor` (its ``encode`` marks each
    token's entity); ``None`` tokenises plainly and sets ``token_entity`` to -1 everywhere (baselines).
    Text swap (probability ``swap_prob`` per report): one *finding sentence* (one that mentions a
    knowledge-graph finding) is replaced by a sentence from another report in the batch whose findings
    differ (any different sentence if none does); label 1 when the report was altered, 0 otherwise
    (not drawn, or nothing to swap with: counted in ``self.stats``).
    """

    def __init__(
        self,
        tokenizer: Any,
        extractor: Any | None = None,
        max_length: int = 128,
        swap_prob: float = 0.5,
        padding: str = "longest",
        generator: torch.Generator | None = None,
        word_index: bool = False,
    ) -> None:
        if not 0.0 <= swap_prob <= 1.0:
            raise ValueError(f"swap_prob={swap_prob} must be in [0, 1]")
        self.tokenizer = tokenizer
        self.extractor = extractor
        self.max_length = max_length
        self.swap_prob = swap_prob
        self.padding = padding
        self.generator = generator
        self.word_index = word_index
        self.stats = {"reports": 0, "swapped": 0, "swap_drawn_but_no_candidate": 0}

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers pickle the collator; a torch.Generator does not pickle, its state does.
        state = dict(self.__dict__)
        gen = state.pop("generator")
        state["_generator_state"] = None if gen is None else gen.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gen_state = state.pop("_generator_state")
        self.__dict__.update(state)
        self.generator = None
        if gen_state is not None:
            self.generator = torch.Generator()
            self.generator.set_state(gen_state)

    # -----------------------------------------------------------------------------------------
    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _choice(self, items: Sequence[Any]) -> Any:
        return items[int(torch.randint(len(items), (), generator=self.generator))]

    def _signature(self, sentence: str) -> frozenset[tuple[str, str]]:
        """The (finding entity, status) pairs a sentence states; empty without an extractor."""
        if self.extractor is None:
            return frozenset()
        graph = self.extractor.graph
        finding = set(graph.finding_ids)
        return frozenset((m.entity_id, m.status) for m in self.extractor.mentions(sentence) if m.entity_id in finding)

    def swap_texts(self, texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """(B texts) -> (B possibly altered texts, (B,) long labels 1 = altered)."""
        sentences = [split_sentences(t) for t in texts]
        signatures = [[self._signature(s) for s in sents] for sents in sentences]
        out, labels = [], []
        for i, text in enumerate(texts):
            if len(texts) < 2 or self._rand() >= self.swap_prob:
                out.append(text)
                labels.append(0)
                continue
            sents, sigs = sentences[i], signatures[i]
            findings = [k for k, sig in enumerate(sigs) if sig]
            candidates = findings or list(range(len(sents)))
            if not candidates:
                self.stats["swap_drawn_but_no_candidate"] += 1
                out.append(text)
                labels.append(0)
                continue
            k = self._choice(candidates)
            own = _norm(sents[k])
            donors = [
                (s, sig)
                for j in range(len(texts))
                if j != i
                for s, sig in zip(sentences[j], signatures[j])
                if _norm(s) != own
            ]
            informative = [s for s, sig in donors if sig and sig != sigs[k]]
            pool = informative or [s for s, _ in donors]
            if not pool:
                self.stats["swap_drawn_but_no_candidate"] += 1
                out.append(text)
                labels.append(0)
                continue
            altered = list(sents)
            altered[k] = self._choice(pool)
            out.append(" ".join(altered))
            labels.append(1)
            self.stats["swapped"] += 1
        return out, torch.tensor(labels, dtype=torch.long)

    # -----------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], padding: str | None = None) -> dict[str, torch.Tensor]:
        """Tokenise with entity marks: input_ids, attention_mask, token_entity, token_status (B,L); ``padding``
        None = the collator's."""
        padding = self.padding if padding is None else padding
        if self.extractor is not None:
            return self.extractor.encode(list(texts), self.tokenizer, self.max_length, padding=padding)
        enc = self.tokenizer(
            list(texts), max_length=self.max_length, truncation=True, padding=padding, return_tensors="pt"
        )
        none = torch.full_like(enc["input_ids"], -1)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_entity": none,
            "token_status": torch.full_like(none, -2),
        }

    def encode_all(self, texts: Sequence[str], chunk: int = 256) -> dict[str, torch.Tensor]:
        """:meth:`encode` of every text padded to ``max_length`` (N,L), in chunks: items that carry their row
        (``input_ids``, ``attention_mask``, ``token_entity``, ``token_status``) are stacked and cut to the batch's
        longest report instead of being tokenised again, the same tensors :meth:`encode` gives the batch."""
        parts = [self.encode(list(texts[s:s + chunk]), padding="max_length") for s in range(0, len(texts), chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in PRECOMPUTED_TOKEN_KEYS}

    def word_indices(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,L) index of the word each token belongs to (GLoRIA aggregates word pieces), -1 for special tokens
        and padding; the same tokenisation as ``encode``."""
        enc = self.tokenizer(list(texts), max_length=self.max_length, truncation=True, padding=self.padding)
        length = len(enc["input_ids"][0])
        rows = [[-1 if w is None else w for w in enc.word_ids(i)] + [-1] * (length - len(enc.word_ids(i)))
                for i in range(len(texts))]
        return torch.tensor(rows, dtype=torch.long)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A list of dataset items -> the pretraining batch (see module docstring)."""
        if not items:
            raise ValueError("PretrainCollator got an empty list of items")
        missing = [k for k in ("trunk" if "trunk" in items[0] else "image", "text", "labels") if k not in items[0]]
        if missing:
            raise KeyError(f"dataset items lack {missing}; MimicPretrainDataset items have image, text, labels")
        texts = [it["text"] if isinstance(it["text"], str) else "" for it in items]
        if "trunk" in items[0]:  # the tower's frozen stages already ran on a precomputed augmented view
            batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in TRUNK_KEYS if k in items[0]}
        else:
            batch = {"image": torch.stack([torch.as_tensor(it["image"], dtype=torch.float32) for it in items])}
        if all(key in items[0] for key in PRECOMPUTED_TOKEN_KEYS):  # the report encoded once (encode_all)
            tokens = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in PRECOMPUTED_TOKEN_KEYS}
            longest = int(tokens["attention_mask"].sum(1).max()) if self.padding == "longest" else None
            batch.update({k: v[:, :longest] for k, v in tokens.items()})
        else:
            batch.update(self.encode(texts))
        batch["labels"] = torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items])
        for key in ("study_id", "index"):
            if key in items[0]:
                batch[key] = torch.tensor([int(it[key]) for it in items], dtype=torch.long)
        for key in PRECOMPUTED_TEXT_KEYS:  # a frozen text tower's outputs, computed once per dataset
            if key in items[0]:
                batch[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
        if self.word_index:
            batch["word_index"] = self.word_indices(texts)
        self.stats["reports"] += len(items)
        if all(key in items[0] for key in PRECOMPUTED_SWAP_KEYS):  # drawn and encoded by the dataset
            for key in PRECOMPUTED_SWAP_KEYS:
                batch[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
            self.stats["swapped"] += int(batch["swap_label"].sum())
        elif self.swap_prob > 0:
            swapped, label = self.swap_texts(texts)
            enc = self.tokenizer(
                swapped, max_length=self.max_length, truncation=True, padding=self.padding, return_tensors="pt"
            )
            batch["swap_input_ids"] = enc["input_ids"]
            batch["swap_attention_mask"] = enc["attention_mask"]
            batch["swap_label"] = label
        return batch
