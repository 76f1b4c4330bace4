"""Packed sequences: several documents per row, each run as if alone (attention within it, RoPE positions
from 0), in every backend; and data.PackedExamples, the rows train.py --pack trains on."""

import numpy as np
import pytest
import torch
from test_s2attn import use_stand_in_flash

import data
from common import tiny_model


def documents_and_rows(lengths, vocab=96, seed=0):
    """Random documents of the given lengths per row, and the rows packing them: (inputs, targets, documents),
    each (B, N), a row's unfilled end one more document whose targets are IGNORE."""
    g = torch.Generator().manual_seed(seed)
    docs = [
        [(torch.randint(0, vocab, (n,), generator=g), torch.randint(0, vocab, (n,), generator=g)) for n in row]
        for row in lengths
    ]
    rows = [
        (
            torch.cat([x for x, _ in row]),
            torch.cat([t for _, t in row]),
            torch.cat([torch.full((len(x),), d) for d, (x, _) in enumerate(row)]),
        )
        for row in docs
    ]
    return [doc for row in docs for doc in row], data.collate(rows, length=max(sum(r) for r in lengths) + 3)


def loss_and_grads(m, x, t, **kw):
    m.zero_grad()
    m.loss_chunk = 7
    loss = m(x, t, **kw)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


LENGTHS = [[3, 11, 6, 9], [17, 5]]  # shorter than G/2, longer than G, straddling groups; the second row padded


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash_attn", "varlen_211"])
@pytest.mark.parametrize("G", [None, 8, 5])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "odd"])
def test_packed_rows_give_the_loss_and_gradients_of_their_documents_alone(monkeypatch, backend, G, heads):
    kernel = backend
    if backend not in ("naive", "sdpa"):
        use_stand_in_flash(monkeypatch, backend)
        kernel = "flash"
    dim = 16 * heads[0]
    m = tiny_model(dim=dim, n_heads=heads[0], n_kv_heads=heads[1], dtype=torch.float64)
    m.set_attention(group_size=G, backend=kernel)
    alone, (x, t, documents) = documents_and_rows(LENGTHS)
    loss, grads = loss_and_grads(m, x, t, positions=documents)
    m.zero_grad()
    expected = sum(m(xd[None], td[None]) for xd, td in alone)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-9, atol=0)
    for k, p in m.named_parameters():
        scale = p.grad.abs().max()
        torch.testing.assert_close(grads[k] / scale, p.grad / scale, rtol=0, atol=1e-9, msg=k)


def test_packed_rows_differ_from_unpacked_ones():
    """Without `documents` the same rows are one sequence each: documents read each other (the test above
    could not fail otherwise)."""
    m = tiny_model(dtype=torch.float64).set_attention(group_size=8)
    _, (x, t, documents) = documents_and_rows(LENGTHS)
    assert (m(x, t, positions=documents) - m(x, t)).abs() > 1e-3


class Examples:
    """A stand-in for data.SFTExamples: example j is j's tokens, of length lengths[j]."""

    def __init__(self, lengths):
        self.lengths, self.n = lengths, len(lengths)

    def example(self, j):
        x = torch.full((self.lengths[j],), j)
        return x, x + 1000


def test_packed_examples_fill_rows_first_fit_and_repeat_per_seed():
    lengths = [int(n) for n in torch.randint(1, 33, (40,), generator=torch.Generator().manual_seed(0))]
    ds = data.PackedExamples(Examples(lengths), seq_len=32, seed=3)
    rows = ds.rows(0)
    assert sorted(j for row in rows for j in row) == list(range(40))  # every example once per pass
    room = [32 - sum(lengths[j] for j in row) for row in rows]
    assert min(room) >= 0
    first_fit = []  # the rule, in plain loops: each example, in the pass's seeded order, into the first row with room
    for j in np.random.default_rng([3, 0]).permutation(40):
        fits = [row for row in first_fit if sum(lengths[e] for e in row) + lengths[j] <= 32]
        if not fits:
            first_fit.append([])
            fits = [first_fit[-1]]
        fits[0].append(j)
    assert rows == first_fit
    x, t, documents = ds[0]
    assert torch.equal(x, torch.cat([torch.full((lengths[j],), j) for j in rows[0]])) and torch.equal(t, x + 1000)
    assert torch.equal(documents, torch.cat([torch.full((lengths[j],), d) for d, j in enumerate(rows[0])]))
    n0 = len(rows)
    assert torch.equal(ds[n0][0], data.PackedExamples(Examples(lengths), 32, seed=3)[n0][0])  # pass 1, again
    assert ds.rows(1) != rows and data.PackedExamples(Examples(lengths), 32, seed=4).rows(0) != rows
    padding = sum(room) / (32 * len(rows))
    assert padding < 0.1, padding  # first fit leaves little room: one row per example would leave half


def test_collate_pads_packed_rows_as_one_more_document():
    rows = [
        (torch.arange(5), torch.arange(5), torch.tensor([0, 0, 1, 1, 1])),
        (torch.arange(3), torch.arange(3), torch.zeros(3, dtype=torch.long)),
    ]
    x, t, documents = data.collate(rows, pad_id=9)
    assert documents.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert x[1].tolist() == [0, 1, 2, 9, 9] and t[1].tolist() == [0, 1, 2, data.IGNORE, data.IGNORE]


def test_step_flops_count_each_packed_document_alone():
    """MFU of packed rows: each document is a sequence of its own (attention squares per document)."""
    import model
    import parallel

    a = model.ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96)
    x, documents = torch.zeros(2, 8, dtype=torch.long), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8])
    assert parallel.step_flops(a, [(x, x, documents, 16)], 1) == sum(parallel.train_flops(a, n) for n in (3, 5, 8))
    assert parallel.step_flops(a, [(x, x, None, 16)], 1) == 2 * parallel.train_flops(a, 8)
