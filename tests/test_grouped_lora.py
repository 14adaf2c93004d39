"""MixLoRA's per-expert LoRA over rows sorted by expert (moelora_lit/grouped_lora.py) against the plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelora_lit.grouped_lora import grouped_lora


def loop(inputs, a_weight, b_weight, base, counts, scaling):
    """The reference: split the rows and the weights by expert, one matmul pair each, concatenated."""
    r = a_weight.shape[0] // len(counts)
    parts = [F.linear(F.linear(x_e, a_weight[e * r:(e + 1) * r]), b_weight[:, e * r:(e + 1) * r]) * scaling
             for e, x_e in enumerate(inputs.split(counts))]
    return base + torch.cat(parts)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [10, 0, 0, 0], [0, 4, 0, 6]])
def test_values_and_gradients_equal_the_loop(counts):
    """Float64, experts without rows included: the output and the gradients of the inputs, both weights and the
    base (which passes the output's gradient through) match the loop's, and an expert without rows gets zero
    gradient in its rows of A and columns of B."""
    torch.manual_seed(0)
    n, r, p = len(counts), 3, sum(counts)
    leaves = [torch.randn(p, 7, dtype=torch.float64, requires_grad=True),       # inputs
              torch.randn(n * r, 7, dtype=torch.float64, requires_grad=True),   # A
              torch.randn(5, n * r, dtype=torch.float64, requires_grad=True),   # B
              torch.randn(p, 5, dtype=torch.float64, requires_grad=True)]       # base
    grad = torch.randn(p, 5, dtype=torch.float64)
    results = []
    for fn in (grouped_lora, loop):
        out = fn(*leaves[:3], leaves[3].clone(), counts, 0.5)         # the base: an intermediate, written in place
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
    grad_a, grad_b = results[0][2], results[0][3]
    for e, rows in enumerate(counts):
        if rows == 0:
            assert not grad_a[e * r:(e + 1) * r].any() and not grad_b[:, e * r:(e + 1) * r].any()
    assert results[0][3].is_contiguous()


def test_in_place_only_when_asked_a_view_base_and_no_double_backward():
    """By default the base is left alone; ``in_place`` writes into it (a leaf is refused). A base that is a view
    of another tensor still gets the right gradients in place, and asking for a second derivative fails loudly."""
    ones = (torch.ones(3, 4), torch.ones(2, 4), torch.ones(2, 2))
    base = torch.zeros(3, 2)
    out = grouped_lora(*ones, base, [2, 1], 1.0)
    assert not base.any() and torch.equal(out, torch.full((3, 2), 4.0))
    out = grouped_lora(*ones, base, [2, 1], 1.0, in_place=True)
    assert out.data_ptr() == base.data_ptr() and torch.equal(base, torch.full((3, 2), 4.0))
    with pytest.raises(RuntimeError, match="leaf"):
        grouped_lora(*ones, torch.zeros(3, 2, requires_grad=True), [2, 1], 1.0, in_place=True)
    torch.manual_seed(2)
    leaves = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 4, dtype=torch.float64,
              requires_grad=True), torch.randn(4, 2, dtype=torch.float64, requires_grad=True)]
    base0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, dtype=torch.float64)
    got = torch.autograd.grad(grouped_lora(*leaves, (base0 * 1.0)[:], [2, 1], 1.5, in_place=True), [*leaves, base0],
                              grad)
    want = torch.autograd.grad(loop(*leaves, base0, [2, 1], 1.5), [*leaves, base0], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    first, = torch.autograd.grad(grouped_lora(*leaves, base0 * 1.0, [2, 1], 1.5).square().sum(), leaves[0],
                                 create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()
