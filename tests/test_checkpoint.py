"""The write stage carries the base checkpoint as stored and finds its vocabulary tensors."""

from __future__ import annotations

import errno
import filecmp
import importlib
import json
import threading
from pathlib import Path

import pytest
import tiny
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_omp import TransplantOptions, checkpoint, transplant
from mergekit_omp.checkpoint import SAFETENSORS_INDEX, read_header, rewrite_shard
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import load_model

transplant_module = importlib.import_module("mergekit_omp.transplant")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, metaspace_tok) -> Path:
    """An untied Llama in several safetensors shards (two layers, 8 KB shards)."""
    model = tiny.tiny_llama_model(metaspace_tok, hidden_size=16, seed=5)
    directory = tmp_path_factory.mktemp("sharded") / "base"
    model.save_pretrained(directory, max_shard_size="8KB")
    metaspace_tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def donor(tmp_path_factory, small_byte_level_tok) -> Path:
    root = tmp_path_factory.mktemp("donor")
    return tiny.tiny_llama(small_byte_level_tok, root / "donor", hidden_size=16, seed=1)


def shard_of(directory: Path) -> dict[str, str]:
    return json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"]


def raw_bytes(path: Path, name: str) -> bytes:
    data_start, header = read_header(path)
    begin, end = header[name]["data_offsets"]
    with open(path, "rb") as handle:
        handle.seek(data_start + begin)
        return handle.read(end - begin)


def test_shards_without_vocabulary_tensors_are_copied_and_the_others_rewritten(
    sharded_base, donor, tmp_path
):
    out = tmp_path / "out"
    result = transplant(
        TransplantOptions(base_model=str(sharded_base), donor=str(donor)), out, progress=False
    )
    weight_map = shard_of(sharded_base)
    assert len(set(weight_map.values())) >= 3
    assert shard_of(out) == weight_map
    rewritten = {weight_map[EMBED], weight_map[LM_HEAD]}
    for shard in set(weight_map.values()) - rewritten:
        assert filecmp.cmp(sharded_base / shard, out / shard, shallow=False), shard
    for shard in rewritten:
        base_start, base_header = read_header(sharded_base / shard)
        _, out_header = read_header(out / shard)
        assert out_header["__metadata__"] == base_header["__metadata__"]
        for name in base_header:
            if name in ("__metadata__", EMBED, LM_HEAD):
                continue
            assert raw_bytes(out / shard, name) == raw_bytes(sharded_base / shard, name)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    data = sum((out / s).stat().st_size - read_header(out / s)[0] for s in set(weight_map.values()))
    assert index["metadata"]["total_size"] == data
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, result.matrices["lm_head"].matrix)
    assert torch.equal(model.model.embed_tokens.weight, result.matrices["embed"].matrix)


def test_untouched_shards_are_copied_while_the_matrices_are_computed(
    sharded_base, donor, tmp_path, monkeypatch
):
    """Each approximation finds every shard without a vocabulary tensor already complete in
    the staging directory, copied by the background thread."""
    weight_map = shard_of(sharded_base)
    untouched = set(weight_map.values()) - {weight_map[EMBED], weight_map[LM_HEAD]}
    copied_by: dict[str, str] = {}
    all_copied = threading.Event()
    real_clone = checkpoint.clone_file

    def recorded_clone(source, destination, *args):
        real_clone(source, destination, *args)
        copied_by[Path(source).name] = threading.current_thread().name
        if set(copied_by) == untouched:
            all_copied.set()

    found_in_staging: list[set[str]] = []
    real_approximate = transplant_module.approximate_new_rows

    def approximate_once_copied(*args, **kwargs):
        assert all_copied.wait(timeout=60)
        (staging,) = tmp_path.glob(".out.partial-*")
        found_in_staging.append(
            {s for s in untouched if filecmp.cmp(sharded_base / s, staging / s, shallow=False)}
        )
        return real_approximate(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "clone_file", recorded_clone)
    monkeypatch.setattr(transplant_module, "approximate_new_rows", approximate_once_copied)
    out = tmp_path / "out"
    result = transplant(
        TransplantOptions(base_model=str(sharded_base), donor=str(donor), method="omp"),
        out,
        progress=False,
    )
    assert found_in_staging == [untouched, untouched]  # the embedding's, then the LM head's
    assert set(copied_by.values()) == {"mergekit-omp shard copy"}
    for shard in untouched:
        assert filecmp.cmp(sharded_base / shard, out / shard, shallow=False), shard
    assert {"copy (overlapped)", "write", "publish"} <= result.report.seconds.keys()


def no_clones(monkeypatch) -> None:
    monkeypatch.setattr(checkpoint.fcntl, "ioctl", lambda *a: (_ for _ in ()).throw(OSError()))


def refuse_o_direct(monkeypatch) -> list[int]:
    """``os.open`` failing with EINVAL for ``O_DIRECT``, as on tmpfs; returns the refusals."""
    real_open, refused = checkpoint.os.open, []

    def open_without_direct(path, flags, *args):
        if flags & checkpoint.os.O_DIRECT:
            refused.append(flags)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint.os, "open", open_without_direct)
    return refused


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 8192 + 17])
def test_direct_copies_are_byte_exact_at_every_size(tmp_path, monkeypatch, size):
    source = tmp_path / "source.bin"
    source.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())
    monkeypatch.setattr(checkpoint, "DIRECT_CHUNK", 8192)
    destination = tmp_path / "copy.bin"
    destination.touch()
    with open(source, "rb") as src:
        direct = checkpoint.copy_direct(src.fileno(), destination, size)
    if not direct:
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT")
    assert destination.read_bytes() == source.read_bytes()


def test_a_filesystem_without_o_direct_gets_a_kernel_copy(tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 100 + b"tail")
    no_clones(monkeypatch)
    refused = refuse_o_direct(monkeypatch)
    ranges = []
    real_copy_range = checkpoint.copy_range
    monkeypatch.setattr(
        checkpoint, "copy_range", lambda *a, **k: ranges.append(a[2:4]) or real_copy_range(*a, **k)
    )
    checkpoint.clone_file(source, tmp_path / "copy.bin")
    assert len(refused) == 1 and ranges == [(0, 25604)]
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


def test_a_cancelled_copy_stops_between_chunks(tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(checkpoint, "COPY_CHUNK", 1024)
    refuse_o_direct(monkeypatch)
    no_clones(monkeypatch)
    asked = []

    def stop_after_three_chunks() -> bool:
        asked.append(True)
        return len(asked) > 3

    with pytest.raises(checkpoint.CopyCancelled):
        checkpoint.clone_file(source, tmp_path / "copy.bin", stop_after_three_chunks)
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()[: 3 * 1024]


def test_a_cancelled_direct_copy_stops_between_chunks(tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(checkpoint, "DIRECT_CHUNK", 4096)
    destination = tmp_path / "copy.bin"
    destination.touch()
    asked = []

    def stop_after_three_chunks() -> bool:
        asked.append(True)
        return len(asked) > 3

    with open(source, "rb") as src:
        try:
            checkpoint.copy_direct(src.fileno(), destination, 16384, stop_after_three_chunks)
        except checkpoint.CopyCancelled:
            assert destination.read_bytes() == source.read_bytes()[: 3 * 4096]
        else:
            pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT")


def test_a_refused_first_direct_write_falls_back(tmp_path, monkeypatch):
    """Some filesystems open with O_DIRECT and refuse the write (EINVAL): nothing written."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 10000)
    no_clones(monkeypatch)

    def refuse(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(checkpoint.os, "pwritev", refuse)
    checkpoint.clone_file(source, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


def test_rewrite_keeps_order_dtypes_and_bytes(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.int64),
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "c": torch.randn(7, dtype=torch.float32),
    }
    save_file(tensors, tmp_path / "in.safetensors", metadata={"format": "pt", "x": "y"})
    new_b = torch.randn(4, 5, dtype=torch.float16)
    rewrite_shard(tmp_path / "in.safetensors", tmp_path / "out.safetensors", {"b": new_b})
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["a"], tensors["a"]) and torch.equal(got["c"], tensors["c"])
    assert got["b"].dtype == torch.float16 and torch.equal(got["b"], new_b)
    _, header = read_header(tmp_path / "out.safetensors")
    assert header["__metadata__"] == {"format": "pt", "x": "y"}
    _, before = read_header(tmp_path / "in.safetensors")
    assert tensor_order(header) == tensor_order(before)


def tensor_order(header: dict) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


@pytest.mark.parametrize(
    "merge_options,expected_file",
    [
        (MergeOptions(out_shard_size=4096), "model-00001-of-"),
        (MergeOptions(safe_serialization=False), "pytorch_model"),
    ],
)
def test_user_output_options_reshard_through_tensor_writer(
    sharded_base, donor, tmp_path, merge_options, expected_file
):
    out = tmp_path / "out"
    transplant(
        TransplantOptions(base_model=str(sharded_base), donor=str(donor)),
        out,
        merge_options=merge_options,
        progress=False,
    )
    assert any(p.name.startswith(expected_file) for p in out.iterdir())
    assert shard_of(sharded_base).keys() - {EMBED, LM_HEAD}  # sanity: there are others
    base_model = transformers.LlamaForCausalLM.from_pretrained(sharded_base)
    out_model = transformers.LlamaForCausalLM.from_pretrained(out)
    base_state, out_state = base_model.state_dict(), out_model.state_dict()
    for name, tensor in base_state.items():
        if name not in (EMBED, LM_HEAD):
            assert torch.equal(out_state[name], tensor), name
    if merge_options.out_shard_size == 4096:
        assert len({p.name for p in out.glob("*.safetensors")}) > 3


def test_pytorch_bin_base(metaspace_tok, donor, tmp_path):
    base = tmp_path / "base"
    model = tiny.tiny_llama_model(metaspace_tok, hidden_size=16, seed=6)
    model.save_pretrained(base, safe_serialization=False)
    metaspace_tok.save_pretrained(base)
    transplant(TransplantOptions(base_model=str(base), donor=str(donor)), tmp_path / "out")
    out_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        if name not in (EMBED, LM_HEAD):
            assert torch.equal(out_model.state_dict()[name], tensor), name


def test_tied_checkpoint_storing_its_lm_head_gets_the_new_matrix_there(
    metaspace_tok, donor, tmp_path
):
    base = tiny.tiny_llama(metaspace_tok, tmp_path / "base", hidden_size=16, tied=True)
    tensors = load_file(base / "model.safetensors")
    tensors[LM_HEAD] = tensors[EMBED].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    result = transplant(TransplantOptions(base_model=str(base), donor=str(donor)), tmp_path / "o")
    with safe_open(tmp_path / "o" / "model.safetensors", framework="pt") as handle:
        assert torch.equal(handle.get_tensor(LM_HEAD), handle.get_tensor(EMBED))
        assert torch.equal(handle.get_tensor(EMBED), result.matrices["embed"].matrix)


def test_known_architectures_come_from_mergekit_others_from_transformers(sharded_base, tmp_path):
    located = load_model(
        str(sharded_base), MergeOptions(), lm_head_falls_back_to_embed=False
    ).located
    assert (located.source, located.embed.name, located.lm_head.name) == (
        "mergekit",
        EMBED,
        LM_HEAD,
    )
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    config = json.loads((sharded_base / "config.json").read_text())
    config["architectures"] = ["SomethingNewForCausalLM"]  # mergekit has no template for it
    (renamed / "config.json").write_text(json.dumps(config))
    tensors = {}
    for shard in sharded_base.glob("*.safetensors"):
        tensors.update(load_file(shard))
    save_file(
        {("language_model." + k if k != LM_HEAD else k): v for k, v in tensors.items()},
        renamed / "model.safetensors",
        metadata={"format": "pt"},
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (renamed / name).write_bytes((sharded_base / name).read_bytes())
    located = load_model(str(renamed), MergeOptions(), lm_head_falls_back_to_embed=False).located
    assert (located.source, located.embed.name, located.lm_head.name) == (
        "transformers",
        "language_model." + EMBED,
        LM_HEAD,
    )


def test_an_architecture_nobody_knows_is_one_clear_error(sharded_base, tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    config = transformers.CLIPVisionConfig(hidden_size=16, num_attention_heads=2).to_dict()
    config["architectures"] = ["MysteryModel"]
    (unknown / "config.json").write_text(json.dumps(config))
    save_file({"x.weight": torch.zeros(2, 2)}, unknown / "model.safetensors")
    with pytest.raises(TransplantError, match="unknown to mergekit and transformers") as error:
        load_model(str(unknown), MergeOptions(), lm_head_falls_back_to_embed=False)
    assert "\n" not in str(error.value)


def test_custom_code_of_the_base_is_carried(metaspace_tok, donor, tmp_path):
    base = tiny.tiny_llama(metaspace_tok, tmp_path / "base", hidden_size=16)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    code = "from transformers import LlamaForCausalLM as CustomForCausalLM\n"
    (base / "modeling_custom.py").write_text(code)
    transplant(TransplantOptions(base_model=str(base), donor=str(donor)), tmp_path / "out")
    assert (tmp_path / "out" / "modeling_custom.py").read_text() == code
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["auto_map"] == config["auto_map"]
