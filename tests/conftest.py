from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real", action="store_true", default=False, help="run tests marked `real`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--real"):
        return
    skip_real = pytest.mark.skip(reason="needs the real models: run with --real")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip_real)


@pytest.fixture(scope="session")
def byte_level_tok():
    return tiny.byte_level_tokenizer(400)


@pytest.fixture(scope="session")
def small_byte_level_tok():
    return tiny.byte_level_tokenizer(300)


@pytest.fixture(scope="session")
def metaspace_tok():
    return tiny.metaspace_tokenizer(300)


@pytest.fixture(scope="session")
def mixed_pair(tmp_path_factory, byte_level_tok, metaspace_tok) -> tuple[Path, Path]:
    """An untied sentencepiece-style base and a tied byte-level donor."""
    root = tmp_path_factory.mktemp("mixed")
    base = tiny.tiny_llama(metaspace_tok, root / "base", hidden_size=24, tied=False, seed=2)
    donor = tiny.tiny_llama(byte_level_tok, root / "donor", hidden_size=16, tied=True, seed=1)
    return base, donor


@pytest.fixture(scope="session")
def byte_level_pair(tmp_path_factory, byte_level_tok, small_byte_level_tok) -> tuple[Path, Path]:
    """Two untied byte-level models (the case mergekit-tokensurgeon matches the same way)."""
    root = tmp_path_factory.mktemp("bytelevel")
    base = tiny.tiny_llama(small_byte_level_tok, root / "base", hidden_size=24, seed=3)
    donor = tiny.tiny_llama(byte_level_tok, root / "donor", hidden_size=32, seed=4)
    return base, donor


def linear_pair(
    root: Path,
    donor_tok,
    base_tok,
    donor_dim: int = 12,
    base_dim: int = 20,
    seed: int = 0,
) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """A pair whose base rows are exactly ``donor_row @ A`` for every token both would have.

    Returns (base dir, donor dir, donor embedding, A). Each base token's row is the donor row
    of the same bytes mapped through A; base tokens the donor lacks get random rows.
    """
    from mergekit_omp.vocabulary import vocabulary_of

    generator = torch.Generator().manual_seed(seed)
    donor_embed = torch.randn(len(donor_tok), donor_dim, generator=generator)
    mapping = torch.randn(donor_dim, base_dim, generator=generator) / donor_dim**0.5
    donor_vocab, base_vocab = vocabulary_of(donor_tok), vocabulary_of(base_tok)
    donor_id_of = {form: i for i, form in donor_vocab.forms.items()}
    base_embed = torch.randn(len(base_tok), base_dim, generator=generator)
    for base_id, form in base_vocab.forms.items():
        if form in donor_id_of:
            base_embed[base_id] = donor_embed[donor_id_of[form]] @ mapping
    base = tiny.tiny_llama(
        base_tok, root / "base", hidden_size=base_dim, embed=base_embed, lm_head=base_embed * 2
    )
    donor = tiny.tiny_llama(
        donor_tok, root / "donor", hidden_size=donor_dim, embed=donor_embed, lm_head=donor_embed * 2
    )
    return base, donor, donor_embed, mapping
