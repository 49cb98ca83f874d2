"""Shared pytest fixtures: tiny real models built offline once per test session."""

import os

import pytest

import tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """Folder of a random tiny Qwen2 causal LM with a tokenizer trained on the spot."""
    return str(tiny_models.build_text_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


@pytest.fixture(scope="session")
def tiny_vl_model(tmp_path_factory):
    """Folder of a random tiny Qwen2.5-VL with its processor (image processor + tokenizer)."""
    return str(tiny_models.build_vl_model(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl"))
