#!/usr/bin/env python
"""Large-model benchmark: a transplant into a synthetic multi-GB model, ours against
mergekit-tokensurgeon, end to end, in the same run.

The base is a Gemma-3-12B-shaped text model (Gemma3ForCausalLM: hidden 3840, 262,144-token
vocabulary with the real Gemma-3 tokenizer, tied embeddings, bfloat16) cut to a few layers,
with random weights, written in several safetensors shards: the embedding (2.0 GB) in a
shard of its own, then one shard per layer (448 MB each). The donor is the real SmolLM2-135M
(``examples/real/prepare.py``), so the approximation problem is that of the real pair.

    python benchmarks/large_model.py [--cache DIR] [--work DIR] [--layers 2,6] [--k 64]
        [--skip-mergekit] [--keep]

For each layer count ``mergekit-omp BASE DONOR OUT -a omp -k 64`` runs as its own subprocess
(wall time, CPU time and peak RSS of that child, as in ``real_pair.py``), and its report gives
the seconds of each stage: the time outside OMP is the wall time less the approximate stage's;
``write`` is the rewrite of the vocabulary shard plus any wait for the copy of the other
shards, which runs beside the approximation (``copy (overlapped)``, not part of the wall time
by itself). mergekit-tokensurgeon runs once, on the largest base. Each timed run starts after
``sync`` (``settle_disk``). Prints the figures, the ratios, and model bytes against
vocabulary-shard bytes. The synthetic models and outputs are deleted at the end unless
``--keep`` (they take about 3 GB per base and as much per output).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from machine import omp_route, print_machine
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_pair import DEFAULT_CACHE, GEMMA, SMOLLM, run_timed  # noqa: E402

GEMMA_3_12B = dict(
    hidden_size=3840,
    intermediate_size=15360,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
    dtype="bfloat16",
)
EMBED = "model.embed_tokens.weight"


def log(message: str) -> None:
    print(f"[large_model {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synthetic_config(gemma: Path, layers: int) -> transformers.PretrainedConfig:
    config = transformers.AutoConfig.from_pretrained(gemma)
    for key, value in GEMMA_3_12B.items():
        setattr(config, key, value)
    config.num_hidden_layers = layers
    config.layer_types = config.layer_types[:layers]
    return config


def random_like(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def build_base(gemma: Path, out: Path, layers: int) -> Path:
    """The synthetic base: shard 1 the embedding and final norm, then one shard per layer."""
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = synthetic_config(gemma, layers)
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    groups: list[list[str]] = [[EMBED, "model.norm.weight"]]
    groups += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, names in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_like(shapes[name], generator) for name in names}
        save_file(tensors, tmp / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        log(f"wrote {filename} ({sum(t.numel() for t in tensors.values()) / 1e6:.0f}M params)")
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (gemma / name).exists():
            shutil.copyfile(gemma / name, tmp / name)
    tmp.rename(out)
    return out


def build_base_apart(gemma: Path, out: Path, layers: int) -> Path:
    """``build_base`` in a process of its own. Linux folds a process's high-water RSS into
    the ``ru_maxrss`` of every child it forks afterwards, so a parent that once held the
    synthetic weights would lend its peak to both tools' timed runs."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(build_base, (gemma, out, layers))


def model_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of all shards, bytes of the shards holding a vocabulary tensor)."""
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    total = sum((directory / s).stat().st_size for s in shards)
    return total, (directory / weight_map[EMBED]).stat().st_size


def settle_disk() -> None:
    """Flush dirty pages before a timed run. The synthetic base (or the previous run's output)
    was just written and would otherwise still be going to disk during the run, slowing
    whichever tool comes first; a user's base was downloaded long before."""
    start = time.perf_counter()
    os.sync()
    log(f"synced the disk before the next run ({time.perf_counter() - start:.1f} s)")


def run_ours(base: Path, donor: Path, out: Path, k: int) -> dict:
    settle_disk()
    report = out.with_name(out.name + ".report.json")
    command = ["mergekit-omp", str(base), str(donor), str(out), "-a", "omp", "-k", str(k)]
    command.append("--overwrite")
    command += ["--report", str(report)]
    code, wall, cpu, rss = run_timed(command, out.with_name(out.name + ".log"))
    saved = json.loads(report.read_text()) if code == 0 else {}
    seconds = saved.get("seconds", {})
    route = omp_route(saved)
    if route is not None:
        log(f"omp {route}")
    omp = seconds.get("approximate", 0.0)
    return dict(
        returncode=code,
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_gb=rss,
        omp_s=omp,
        outside_omp_s=wall - omp,
        write_s=seconds.get("write", 0.0),
        copy_overlapped_s=seconds.get("copy (overlapped)", 0.0),
        stages=seconds,
    )


def run_mergekit(base: Path, donor: Path, out: Path, k: int) -> dict:
    command = ["mergekit-tokensurgeon", str(base), str(donor), str(out), "-a", "omp", "-k", str(k)]
    settle_disk()
    code, wall, cpu, rss = run_timed(command, out.with_name(out.name + ".log"))
    return dict(returncode=code, wall_s=wall, cpu_s=cpu, peak_rss_gb=rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--work", type=Path, default=None, help="default: CACHE/large-model")
    parser.add_argument("--layers", default="2,6", help="layer counts of the synthetic bases")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models")
    args = parser.parse_args()
    print_machine()
    cache = args.cache.expanduser()
    work = (args.work or cache / "large-model").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    donor = cache / SMOLLM
    counts = sorted(int(n) for n in args.layers.split(","))
    results: dict = {"ours": {}, "mergekit": None}
    try:
        for layers in counts:
            base = build_base_apart(cache / GEMMA, work / f"base-{layers}", layers)
            total, vocab = model_bytes(base)
            row = run_ours(base, donor, work / f"ours-{layers}", args.k)
            row.update(model_gb=total / 1e9, vocabulary_shards_gb=vocab / 1e9)
            results["ours"][layers] = row
            log(json.dumps(row))
            if row["returncode"] != 0:
                raise SystemExit(f"mergekit-omp failed: see {work / f'ours-{layers}.log'}")
        if not args.skip_mergekit:
            largest = counts[-1]
            row = run_mergekit(work / f"base-{largest}", donor, work / "mergekit", args.k)
            results["mergekit"] = dict(row, layers=largest)
            log(json.dumps(row))
            if row["returncode"] != 0:
                raise SystemExit(f"mergekit-tokensurgeon failed: see {work / 'mergekit.log'}")
    finally:
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if not args.keep:
            for path in work.iterdir():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
    print_summary(results)


def print_summary(results: dict) -> None:
    print(
        f"{'tool':<24}{'layers':>7}{'model GB':>10}{'vocab GB':>10}{'wall s':>9}"
        f"{'CPU s':>8}{'RSS GiB':>9}{'OMP s':>8}{'other s':>9}{'write s':>9}{'copy s':>8}"
    )
    for layers, row in results["ours"].items():
        print(
            f"{'mergekit-omp':<24}{layers:>7}{row['model_gb']:>10.2f}"
            f"{row['vocabulary_shards_gb']:>10.2f}{row['wall_s']:>9.1f}{row['cpu_s']:>8.1f}"
            f"{row['peak_rss_gb']:>9.2f}{row['omp_s']:>8.1f}{row['outside_omp_s']:>9.1f}"
            f"{row['write_s']:>9.1f}{row['copy_overlapped_s']:>8.1f}"
        )
    theirs = results["mergekit"]
    if theirs:
        ours = results["ours"][theirs["layers"]]
        print(
            f"{'mergekit-tokensurgeon':<24}{theirs['layers']:>7}{'':>20}{theirs['wall_s']:>9.1f}"
            f"{theirs['cpu_s']:>8.1f}{theirs['peak_rss_gb']:>9.2f}"
        )
        print(
            f"ratios (mergekit / ours): wall {theirs['wall_s'] / ours['wall_s']:.2f}x, "
            f"peak RSS {theirs['peak_rss_gb'] / ours['peak_rss_gb']:.2f}x"
        )


if __name__ == "__main__":
    main()
