"""No network unless asked: what the ci profile builds (towers, tokenizer, entity embeddings, a training step)
opens no socket to the outside. A code path that reaches for the Hugging Face or timm hub without a profile
asking for it fails here instead of hanging or failing later on a machine without internet."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            attempts.append(address)
            raise OSError(f"test_offline: network access to {address} refused")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **k: (attempts.append(address), (_ for _ in ()).throw(
                            OSError(f"test_offline: network access to {address} refused")))[1])
    yield attempts
    assert not attempts, f"code reached for the network: {attempts}"


def test_the_ci_towers_tokenizer_and_a_training_step_need_no_network(no_network, tmp_path, monkeypatch):
    from mlip_core.config import pretrain_config
    from mlip_core.knowledge.graph import KnowledgeGraph
    from mlip_core.model.encoders import TextTower, build_tokenizer
    from mlip_core.model.mlip import MLIP, embed_entities

    monkeypatch.setenv("MLIP_WORKSPACE", str(tmp_path))
    cfg = pretrain_config("mlip", image_tower="tf_efficientnet_lite0", image_pretrained="efficientnet_lite0_package",
                          image_size=64, frozen_stages=3, text_tower="minilm", text_allow_download=False,
                          max_length=32, freeze_text_layers=6)
    tokenizer = build_tokenizer(cfg.model.text)
    graph = KnowledgeGraph.load_default()
    entities = embed_entities(TextTower(cfg.model.text), tokenizer, graph.entity_texts(), max_length=32)
    model = MLIP(cfg, entities, prototype_entities=[graph.entity_ids.index(i) for i in graph.finding_ids])
    enc = tokenizer(["No pleural effusion.", "Mild cardiomegaly."], padding="max_length", max_length=32,
                    truncation=True, return_tensors="pt")
    img = model.encode_image(torch.randn(2, 1, 64, 64))
    txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert img.shape == txt.shape == (2, cfg.model.embed_dim)


def test_the_guard_itself_refuses_an_outside_connection(no_network):
    with pytest.raises(OSError, match="refused"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    no_network.clear()  # the refusal was the point here
