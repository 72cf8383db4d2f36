"""Leave-out with anchors like the new tokens: which anchors it holds out, and that they are
hidden as the random ones are."""

from __future__ import annotations

import pytest
import tiny
import torch
from mergekit.options import MergeOptions

from mergekit_omp.evaluate.leave_out import (
    choose_held_out,
    leave_out_tasks,
    nearest_anchor_votes,
)
from mergekit_omp.load import load_pair
from mergekit_omp.match import MatchKind, VocabularyMatch


def match_of(anchors: dict[int, int], new_tokens: list[int]) -> VocabularyMatch:
    return VocabularyMatch(
        matched={d: (b, MatchKind.EXACT) for d, b in anchors.items()}, new_tokens=new_tokens
    )


def test_votes_count_each_new_tokens_nearest_anchor_by_cosine():
    # Donor ids 0-3 are anchors (base ids 10-13) along four directions; 4-8 are new tokens.
    donor_rows = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [-1.0, 0.0, 0.0],
            [5.0, 0.1, 0.0],  # -> 0
            [0.9, 0.0, 0.2],  # -> 0
            [0.0, 0.2, 3.0],  # -> 2
            [-0.1, 0.0, 0.05],  # -> 3 (cosine ignores the small norm)
            [2.0, 0.3, 0.0],  # -> 0
        ]
    )
    match = match_of({0: 10, 1: 11, 2: 12, 3: 13}, [4, 5, 6, 7, 8])
    assert nearest_anchor_votes(match, donor_rows, seed=0) == {10: 3, 12: 1, 13: 1}
    held = choose_held_out(match, 2, seed=0, like="new", donor_rows=donor_rows)
    assert sorted(held.base_ids) == [10, 12] or sorted(held.base_ids) == [10, 13]
    assert 10 in choose_held_out(match, 1, seed=5, like="new", donor_rows=donor_rows).base_ids


def test_like_new_fills_up_with_a_seeded_random_order_after_the_voted_anchors():
    donor_rows = torch.eye(6)
    donor_rows[5] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.1])  # new token near anchor 3
    match = match_of({i: 100 + i for i in range(5)}, [5])
    for seed in range(4):
        held = choose_held_out(match, 3, seed=seed, like="new", donor_rows=donor_rows)
        assert 103 in held.base_ids and len(held.base_ids) == 3
    fills = {
        tuple(sorted(choose_held_out(match, 3, seed=s, like="new", donor_rows=donor_rows).base_ids))
        for s in range(8)
    }
    assert len(fills) > 1


def test_like_new_samples_the_voters_when_there_are_many(monkeypatch):
    import mergekit_omp.select.holdout as holdout

    monkeypatch.setattr(holdout, "VOTERS", 10)
    generator = torch.Generator().manual_seed(0)
    donor_rows = torch.randn(60, 4, generator=generator)
    match = match_of({i: i for i in range(20)}, list(range(20, 60)))
    votes = nearest_anchor_votes(match, donor_rows, seed=1)
    assert sum(votes.values()) == 10
    assert votes == nearest_anchor_votes(match, donor_rows, seed=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("like-new")
    return tiny.linear_pair(root, tiny.byte_level_tokenizer(400), tiny.metaspace_tokenizer(300))


def test_like_new_holds_out_other_anchors_than_random_and_hides_them(pair):
    base, donor = load_pair(str(pair[0]), str(pair[1]), MergeOptions())
    (random_task, *_) = leave_out_tasks(base, donor, holdout=20, seed=0, like="random")
    (new_task, *_) = leave_out_tasks(base, donor, holdout=20, seed=0, like="new")
    assert new_task.held_out >= 20
    assert set(new_task.problem.target_ids) != set(random_task.problem.target_ids)
    problem = new_task.problem
    hidden = set(range(base.embed.shape[0])) - set(problem.base_vocab.forms)
    assert len(hidden) >= 1 and not hidden & set(problem.base_anchor_ids)


def test_eval_command_holds_out_anchors_like_the_new_tokens_when_asked(pair):
    from click.testing import CliRunner

    from mergekit_omp.cli.evaluate import main

    runner = CliRunner()
    args = [str(pair[0]), str(pair[1]), "-a", "fvt", "-a", "omp:k=4", "--holdout", "20"]
    like_new = runner.invoke(main, [*args, "--holdout-like", "new"])
    random = runner.invoke(main, args)
    assert like_new.exit_code == 0, like_new.output
    assert "Held-out anchors (like the new tokens)" in like_new.output
    assert "Held-out anchors (random)" in random.output
    assert like_new.output.split("\n", 1)[1] != random.output.split("\n", 1)[1]
