from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import tiny

FIXED_CALIBRATION = Path(__file__).parent / "fixtures" / "calibration.json"
# Plans made from fixed rates, in this process and in the commands it runs, so that no test
# depends on this machine's speed (tests/test_calibrate.py measures).
os.environ["MERGEKIT_OMP_CALIBRATION"] = str(FIXED_CALIBRATION)
# A runner started in the background by a non-interactive shell inherits SIGINT ignored, and
# so would every command the tests start: the signal tests need Ctrl-C to act as in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
