"""Shared fixtures: tiny registered CLIP configs, random init, generated data; no downloads."""

from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch

from nearl_core.backbone import build_backbone
from nearl_core.config import NearlConfig, from_dict, load_config
from nearl_core.demo_data import generate_demo_data
from nearl_core.model import NearlCLIP, build_model

CLASSES = ("normal", "nodule", "opacity")
# open_clip native towers with equal depths; native with unequal depths and widths; a timm ViT
# (3 blocks, width 48) with a Hugging Face BERT text encoder (2 layers, width 32): BiomedCLIP's layout.
TINY_MODELS = ("nearl-tiny", "nearl-tiny-deep-text", "nearl-tiny-timm-bert")
LAYOUT_MODELS = ("nearl-tiny", "nearl-tiny-timm-bert")  # one per tower layout, for the costlier invariants
MODES = ("per-image", "shared")

# A BERT WordPiece vocabulary small enough to read: special tokens, single characters (so
# any lower-case text tokenises), word-piece continuations and a few whole words.  "nodule"
# and "opacity" are left out on purpose: they split into pieces, so the test prompts have
# different lengths and the shorter ones carry padding inside the trimmed context.
_TINY_WORDS = ("a", "an", "the", "of", "with", "image", "showing", "photo", "medical", "chest", "x", "ray",
               "patient", "normal", "pneumonia", "scan", "ct", "mri", "tissue", "lesion")


def tiny_bert_vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    return list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *pieces, *_TINY_WORDS]))


def write_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 2, max_positions: int = 64) -> Path:
    """Write a Hugging Face BERT config and a fast tokenizer (JSON files only) into ``folder``.

    This is how ``nearl_core/model_configs/hf/nearl-tiny-bert`` was made (the test
    ``test_shipped_tiny_bert_is_what_the_writer_produces`` keeps them in step).  Only JSON
    files, because Flower's app bundle carries no other data files to the simulation.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertTokenizerFast

    vocab = tiny_bert_vocab()
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", do_lower_case=True, model_max_length=max_positions,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for saved in map(Path, tokenizer.save_pretrained(folder)):
        if saved.suffix != ".json" and saved.is_file():  # e.g. vocab.txt: tokenizer.json holds the vocabulary
            saved.unlink()
    BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=max_positions, pad_token_id=ids["[PAD]"],
    ).save_pretrained(folder)
    return folder


def tiny_config(name: str = "nearl-tiny", mode: str = "per-image", **sections) -> NearlConfig:
    raw = load_config("demo").to_dict()
    raw["model"]["name"] = name
    raw["adapter"]["text-conditioning"] = mode
    for section, values in sections.items():
        raw[section].update(values)
    return from_dict(raw)


def tiny_model(name: str = "nearl-tiny", mode: str = "per-image", seed: int = 0, **sections) -> NearlCLIP:
    torch.manual_seed(seed)
    cfg = tiny_config(name, mode, **sections)
    return build_model(cfg, CLASSES, backbone=build_backbone(cfg.model))


def randomize_adapters(model: NearlCLIP, std: float = 0.2, seed: int = 1) -> None:
    """Move adapters away from zero-init so that updates are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def images_for(model: NearlCLIP, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.clip.visual.image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def task_identity():
    """A ServerApp's task identity (1, 0, 1) for the test, restored afterwards: strategies build
    Messages, which read it.  Strategy test modules apply it to every test with
    ``pytestmark = pytest.mark.usefixtures("task_identity")``."""
    from tests.fed_helpers import restore_task_identity, server_task_identity

    saved = server_task_identity()
    yield
    restore_task_identity(saved)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Two small synthetic sites, generated once per test session."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, 2, train_per_site=48, val_per_site=12, test_per_site=12, seed=0)
    return root


# `make test` hands whole modules to three workers in collection order: the longest modules start first,
# so that no worker is left running one of them alone at the end. Measured (module seconds under load,
# longest first); other modules marked slow come next, then the rest in their usual order.
LONGEST_MODULES = ("test_simulation.py", "test_federation_e2e.py", "test_personalized_e2e.py",
                   "test_reconnect_e2e.py", "test_methods.py", "test_privacy.py", "test_deploy.py",
                   "test_warm_e2e.py", "test_flood.py", "test_reproducible.py", "test_secagg_loopback.py")


def pytest_collection_modifyitems(config, items):
    """Longest modules first (a stable sort: the tests of a module keep their order)."""
    slow_modules = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_MODULES:
            return 0, LONGEST_MODULES.index(name)
        return (1 if name in slow_modules else 2), 0

    items.sort(key=rank)

