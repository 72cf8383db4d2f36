from __future__ import annotations

import json

import pytest
import tiny
import torch
import transformers
from tiny import linear_pair, load_tensors

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.vocabulary import vocabulary_of


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory, byte_level_tok, metaspace_tok):
    root = tmp_path_factory.mktemp("known")
    return linear_pair(root, byte_level_tok, metaspace_tok)


def true_new_rows(result, donor_embed, mapping, matrix="embed", scale=1.0):
    match = result.matrices[matrix].match
    ids = torch.tensor(match.new_tokens)
    return ids, (donor_embed[ids] * scale) @ mapping


@pytest.mark.parametrize("matrix,scale", [("embed", 1.0), ("lm_head", 2.0)])
def test_omp_recovers_a_linear_map_exactly_when_k_spans_the_donor_space(
    known_answer, matrix, scale
):
    base, donor, donor_embed, mapping = known_answer
    result = transplant(
        TransplantOptions(
            base_model=str(base), donor=str(donor), method="omp", parameters={"k": 12}
        ),
        progress=False,
    )
    ids, expected = true_new_rows(result, donor_embed, mapping, matrix, scale)
    assert len(ids) > 100
    got = result.matrices[matrix].matrix[ids]
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_omp_error_is_the_donor_residual_mapped_through_a(known_answer):
    """With k < D the base error is exactly (donor residual) @ A."""
    base, donor, donor_embed, mapping = known_answer
    k = 4
    result = transplant(
        TransplantOptions(
            base_model=str(base), donor=str(donor), method="omp", parameters={"k": k}
        ),
        progress=False,
    )
    ids, expected = true_new_rows(result, donor_embed, mapping)
    approximation = result.matrices["embed"].approximation
    donor_ids, _ = result.matrices["embed"].match.anchors()
    anchors = donor_embed[torch.tensor(donor_ids)]
    reconstruction = torch.bmm(
        approximation.coeffs.unsqueeze(1), anchors[approximation.indices]
    ).squeeze(1)
    residual = donor_embed[ids] - reconstruction
    got = result.matrices["embed"].matrix[ids]
    assert torch.allclose(got - expected, -residual @ mapping, atol=1e-4)
    assert residual.norm(dim=1).mean() > 0.1  # k=4 really is an approximation here


def test_matched_rows_are_copied_and_ids_follow_the_donor(mixed_pair):
    base, donor = mixed_pair
    result = transplant(TransplantOptions(base_model=str(base), donor=str(donor)), progress=False)
    base_tensors = load_tensors(base)
    embed = result.matrices["embed"]
    for donor_id, (base_id, _) in embed.match.matched.items():
        assert torch.equal(
            embed.matrix[donor_id], base_tensors["model.embed_tokens.weight"][base_id]
        )
    donor_vocab = vocabulary_of(transformers.AutoTokenizer.from_pretrained(donor))
    base_vocab = vocabulary_of(transformers.AutoTokenizer.from_pretrained(base))
    for donor_id, (base_id, kind) in embed.match.matched.items():
        if kind.value == "exact":
            assert donor_vocab.forms[donor_id] == base_vocab.forms[base_id]


def test_output_loads_generates_and_round_trips_text(mixed_pair, tmp_path):
    base, donor = mixed_pair
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    transplant(
        TransplantOptions(
            base_model=str(base), donor=str(donor), method="omp", parameters={"k": 8}
        ),
        out,
        report_path=report,
        progress=False,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    donor_tokenizer = transformers.AutoTokenizer.from_pretrained(donor)
    text = "Café naïve 日本語\n\tdef f(x): return 42"
    assert tokenizer(text)["input_ids"] == donor_tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    generated = model.generate(
        **tokenizer("The quick", return_tensors="pt"), max_new_tokens=4, do_sample=False
    )
    assert generated.shape == (1, len(tokenizer("The quick")["input_ids"]) + 4)
    assert model.config.vocab_size == len(donor_tokenizer)
    assert model.config.bos_token_id == donor_tokenizer.bos_token_id
    assert model.config.eos_token_id == donor_tokenizer.eos_token_id
    assert model.config.hidden_size == 24
    assert model.get_input_embeddings().weight.shape == (len(donor_tokenizer), 24)
    assert not model.config.tie_word_embeddings
    saved = json.loads(report.read_text())
    assert saved["matrices"][0]["counts"]["approximated"] > 0
    assert set(saved["seconds"]) >= {"load", "match", "approximate", "write"}


def test_tied_base_stays_tied_and_untied_donor_lm_head_is_ignored(
    tmp_path, metaspace_tok, byte_level_tok
):
    base = tiny.tiny_llama(metaspace_tok, tmp_path / "base", hidden_size=16, tied=True, seed=5)
    donor = tiny.tiny_llama(byte_level_tok, tmp_path / "donor", hidden_size=16, tied=False, seed=6)
    out = tmp_path / "out"
    result = transplant(
        TransplantOptions(base_model=str(base), donor=str(donor)), out, progress=False
    )
    assert list(result.matrices) == ["embed"]
    assert "lm_head.weight" not in load_tensors(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_base_with_tied_donor_approximates_lm_head_from_donor_embeddings(mixed_pair):
    base, donor = mixed_pair
    result = transplant(TransplantOptions(base_model=str(base), donor=str(donor)), progress=False)
    assert set(result.matrices) == {"embed", "lm_head"}
    embed, lm_head = result.matrices["embed"], result.matrices["lm_head"]
    assert embed.match.new_tokens == lm_head.match.new_tokens
    assert not torch.equal(embed.matrix, lm_head.matrix)


def test_padding_and_extra_rows(tmp_path, metaspace_tok, byte_level_tok):
    base = tiny.tiny_llama(metaspace_tok, tmp_path / "base", hidden_size=16, extra_rows=9, seed=7)
    donor = tiny.tiny_llama(
        byte_level_tok, tmp_path / "donor", hidden_size=16, extra_rows=5, seed=8
    )
    out = tmp_path / "out"
    transplant(
        TransplantOptions(base_model=str(base), donor=str(donor), pad_vocab_to_multiple_of=64),
        out,
        progress=False,
    )
    tensors = load_tensors(out)
    rows = len(byte_level_tok) + 5
    padded = -(-rows // 64) * 64
    assert tensors["model.embed_tokens.weight"].shape == (padded, 16)
    assert tensors["lm_head.weight"].shape == (padded, 16)
    assert torch.count_nonzero(tensors["model.embed_tokens.weight"][len(byte_level_tok) :]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == padded


def test_same_inputs_same_bytes(mixed_pair, tmp_path):
    base, donor = mixed_pair
    options = TransplantOptions(base_model=str(base), donor=str(donor), new_vocab_noise=0.01)
    first_out, second_out = tmp_path / "a" / "out", tmp_path / "b" / "out"  # the card names OUT
    first = transplant(options, first_out, progress=False)
    second = transplant(options, second_out, progress=False)
    assert torch.equal(first.matrices["embed"].matrix, second.matrices["embed"].matrix)
    # Weights, tokenizer, configs, recipe and card: every file the same bytes (#28 item 10);
    # the report differs only in its seconds (test_reports_of_two_runs_differ_only_...).
    names = {p.name for p in first_out.iterdir()}
    assert names == {p.name for p in second_out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= names
    for name in sorted(names - {"mergekit_omp_report.json"}):
        assert (first_out / name).read_bytes() == (second_out / name).read_bytes(), name


def test_omp_rows_are_batch_omp_applied_to_base_anchors(mixed_pair):
    base, donor = mixed_pair
    result = transplant(
        TransplantOptions(
            base_model=str(base), donor=str(donor), method="omp", parameters={"k": 6}
        ),
        progress=False,
    )
    base_embed = load_tensors(base)["model.embed_tokens.weight"]
    donor_embed = load_tensors(donor)["model.embed_tokens.weight"]
    embed = result.matrices["embed"]
    donor_ids, base_ids = embed.match.anchors()
    indices, coeffs = batch_omp(donor_embed[embed.match.new_tokens], donor_embed[donor_ids], 6)
    expected = torch.bmm(coeffs.unsqueeze(1), base_embed[base_ids][indices]).squeeze(1)
    assert torch.allclose(embed.matrix[embed.match.new_tokens], expected, atol=1e-6)


def test_garbage_collection_pause_restores_the_collectors_state() -> None:
    import gc

    from mergekit_omp.load import garbage_collection_paused

    assert gc.isenabled()
    with garbage_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with garbage_collection_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_assembled_matrix_copies_matched_rows_takes_new_rows_and_zeroes_the_rest(dtype):
    from mergekit_omp.assemble import assemble_matrix
    from mergekit_omp.match import MatchKind, VocabularyMatch

    base = torch.arange(1, 31, dtype=torch.bfloat16).reshape(10, 3)
    match = VocabularyMatch(
        matched={0: (4, MatchKind.EXACT), 2: (9, MatchKind.BYTE), 5: (4, MatchKind.SPECIAL)},
        new_tokens=[1, 6],
    )
    new_rows = torch.tensor([[0.5, 1.5, 2.5], [-1.0, -2.0, -3.0]])
    result = assemble_matrix(base, match, new_rows, out_rows=8, dtype=dtype)
    expected = torch.zeros(8, 3, dtype=dtype)
    expected[0], expected[2], expected[5] = base[4], base[9], base[4]
    expected[1], expected[6] = new_rows[0], new_rows[1]
    assert result.dtype == dtype
    assert torch.equal(result, expected)


@pytest.mark.parametrize("method", ["omp", "auto"])
@pytest.mark.parametrize("through_a_link", [False, True], ids=["same-path", "symlink"])
def test_donor_equal_to_base_is_an_exact_identity(mixed_pair, tmp_path, method, through_a_link):
    base = mixed_pair[0]
    donor = base
    if through_a_link:
        donor = tmp_path / "link"
        donor.symlink_to(base)
    out = tmp_path / "out"
    options = TransplantOptions(base_model=str(base), donor=str(donor), method=method)
    result = transplant(options, out, progress=False)
    assert all(m.counts.get("approximated", 0) == 0 for m in result.report.matrices)
    written, original = load_tensors(out), load_tensors(base)
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_reports_of_two_runs_differ_only_in_their_seconds(mixed_pair, tmp_path):
    base, donor = mixed_pair
    options = TransplantOptions(base_model=str(base), donor=str(donor))  # auto: a choice
    reports = []
    for run in ("first", "second"):
        out = tmp_path / run / "out"
        transplant(options, out, progress=False)
        reports.append(json.loads((out / "mergekit_omp_report.json").read_text()))
        assert (out / "README.md").read_text() == (
            tmp_path / "first" / "out" / "README.md"
        ).read_text()
    timings = [report.pop("seconds") for report in reports]
    assert reports[0] == reports[1]
    assert all(m["choice"] and "seconds" not in m["choice"] for m in reports[0]["matrices"])
    assert {"load", "approximate", "auto embed (within approximate)"} <= timings[0].keys()


def test_the_donors_matrices_are_freed_before_any_matrix_is_approximated(known_answer, monkeypatch):
    import gc
    import importlib
    import weakref

    module = importlib.import_module("mergekit_omp.transplant")  # the package's name is the call

    base, donor, donor_embed, mapping = known_answer
    loaded, seen = [], []
    load_pair, approximate = module.load_pair, module.approximate_new_rows

    def recording_load_pair(*args):
        models = load_pair(*args)
        loaded.extend(weakref.ref(t) for t in (models[1].embed, models[1].lm_head))
        return models

    def checking_approximate(problem, *args, **kwargs):
        gc.collect()
        seen.append([ref() is None for ref in loaded])
        return approximate(problem, *args, **kwargs)

    monkeypatch.setattr(module, "load_pair", recording_load_pair)
    monkeypatch.setattr(module, "approximate_new_rows", checking_approximate)
    result = transplant(
        TransplantOptions(
            base_model=str(base), donor=str(donor), method="omp", parameters={"k": 12}
        ),
        progress=False,
    )
    assert seen == [[True, True], [True, True]]  # embed and lm_head, both donor matrices gone
    ids, expected = true_new_rows(result, donor_embed, mapping, "lm_head", 2.0)
    assert torch.allclose(result.matrices["lm_head"].matrix[ids], expected, atol=1e-4, rtol=1e-4)


def test_loading_leaves_no_shard_open_to_keep_the_checkpoints_mapped(known_answer):
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    from mergekit_omp.load import load_pair

    base, donor, _, _ = known_answer
    models = load_pair(str(base), str(donor), MergeOptions())
    assert all(model.embed is not None for model in models)
    assert [LoaderCache().get(model.reference).current_shard for model in models] == [None, None]
