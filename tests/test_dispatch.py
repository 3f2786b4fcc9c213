"""Unit tests of dsv3ref.comms.dispatch: the dispatch layout against a brute-force count, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.comms.dispatch import DispatchInputError, dispatch_layout


@st.composite
def layouts(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    """Routing indices [N, k] (distinct experts per token, some slots -1) and an EP placement."""
    nodes, ranks_per_node = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ranks = nodes * ranks_per_node
    experts = ranks * draw(st.integers(1, 4))
    k = draw(st.integers(1, min(8, experts)))
    rows = draw(st.lists(st.permutations(range(experts)).map(lambda p: p[:k]), min_size=0, max_size=24))
    dropped = draw(st.lists(st.booleans(), min_size=len(rows) * k, max_size=len(rows) * k))
    flat = [-1 if d else e for d, e in zip(dropped, (e for row in rows for e in row), strict=True)]
    return torch.tensor(flat, dtype=torch.long).view(len(rows), k), experts, ranks, ranks_per_node


@given(layouts())
def test_layout_equals_a_brute_force_count(case):
    indices, experts, ranks, per_node = case
    layout = dispatch_layout(indices, experts, ranks, per_node)
    per_rank = experts // ranks
    in_rank = [[any(e >= 0 and e // per_rank == r for e in row) for r in range(ranks)] for row in indices.tolist()]
    in_node = [[any(row_ranks[n * per_node:(n + 1) * per_node]) for n in range(ranks // per_node)]
               for row_ranks in in_rank]
    assert layout.tokens_per_expert.tolist() == [sum(row.count(e) for row in indices.tolist()) for e in range(experts)]
    assert layout.is_token_in_rank.tolist() == (in_rank or [])
    assert layout.is_token_in_rank.shape == (indices.shape[0], ranks)
    assert layout.tokens_per_rank.tolist() == [sum(r[i] for r in in_rank) for i in range(ranks)]
    assert layout.tokens_per_node.tolist() == [sum(n[i] for n in in_node) for i in range(ranks // per_node)]
    assert layout.is_token_in_node.tolist() == (in_node or [])
    assert layout.tokens_per_expert.sum() == (indices >= 0).sum()


def test_layout_exact_example():
    # 8 experts on 4 ranks (2 each), 2 ranks per node. Token 0 -> experts 0, 1 (rank 0 twice), 6 (rank 3).
    layout = dispatch_layout(torch.tensor([[0, 1, 6], [5, -1, 4], [-1, -1, -1]]), 8, 4, 2)
    assert layout.tokens_per_expert.tolist() == [1, 1, 0, 0, 1, 1, 1, 0]
    assert layout.tokens_per_rank.tolist() == [1, 0, 1, 1]
    assert layout.tokens_per_node.tolist() == [1, 2]
    assert layout.is_token_in_rank.tolist() == [[True, False, False, True], [False, False, True, False],
                                                [False, False, False, False]]
    assert dispatch_layout(torch.tensor([[0, 7]]), 8, 4).tokens_per_node.tolist() == [1]  # one node by default


@pytest.mark.parametrize(("args", "match"), [
    ((torch.tensor([[0, 1]]), 8, 3, None), "n_ranks: expected a divisor of n_experts 8"),
    ((torch.tensor([[0, 1]]), 8, 4, 3), "ranks_per_node: expected a divisor of n_ranks 4"),
    ((torch.tensor([[0, 1]]), 8, 0, None), ">= 1"),
    ((torch.tensor([[0, 8]]), 8, 4, None), r"\[-1, 8\)"),
    ((torch.tensor([[-2, 1]]), 8, 4, None), r"\[-1, 8\)"),
    ((torch.tensor([0, 1]), 8, 4, None), r"\[tokens, k\]"),
    ((torch.tensor([[0.0, 1.0]]), 8, 4, None), "integer"),
])
def test_bad_input(args, match):
    with pytest.raises(DispatchInputError, match=match):
        dispatch_layout(*args)
