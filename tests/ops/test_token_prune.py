"""txc::prune_plan (applied by merge_tokens) against a loop-by-loop reference; scores, padding, export."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch
from torch.nn import functional as F

from txcompile.ops.token_merge import init_token_state, size_bias
from txcompile.ops.token_prune import attention_probs, pagerank, pruned_length, token_prune_step

txc = torch.ops.txc


# ---------------------------------------------------------------- reference: pruning one unpadded sequence, by loops


def reference_prune(x, size, score, keep, protected, fuse):
    """EViT's top-k on one sequence: x [T, C], size [T], score [T].

    Returns (x_out [T', C], size_out [T'], source) where source[i] is the output slot holding (or standing for)
    original token i. With fuse, the pruned tokens become one extra token, their size-weighted mean; without, a
    pruned token is represented by the nearest kept token before it.
    """
    num = x.shape[0]
    free = list(range(protected, num))
    count = math.ceil(Fraction(str(keep)) * len(free))  # keep as the decimal the user wrote
    ranked = sorted(free, key=lambda i: (-float(score[i]), i))  # highest first, lower position first on ties
    kept = sorted(ranked[:count])
    pruned = sorted(ranked[count:])
    slots = list(range(min(protected, num))) + kept
    x_out = [x[i] for i in slots]
    size_out = [size[i] for i in slots]
    source = {t: n for n, t in enumerate(slots)}
    if fuse and pruned:
        total = sum(size[i] for i in pruned)
        x_out.append(sum(size[i] * x[i] for i in pruned) / total)
        size_out.append(total)
        source.update({i: len(slots) for i in pruned})
    elif pruned:
        for i in pruned:
            before = [t for t in slots if t < i]
            source[i] = source[before[-1]] if before else 0
    return torch.stack(x_out), torch.stack(size_out), [source[i] for i in range(num)]


def _inputs(batch, tokens, seed, dtype=torch.float64, chans=5, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, chans, generator=g, dtype=dtype)
    size = torch.randint(1, 5, (batch, tokens), generator=g).to(dtype)  # as after earlier reductions
    score = (
        torch.randint(0, 3, (batch, tokens), generator=g).to(dtype) if ties else torch.rand(batch, tokens, generator=g)
    )
    return x, size, score


def _prune(x, size, valid, score, keep, protected, fuse):
    dest, kept, merge_valid, valid_out = txc.prune_plan(score, valid, keep, protected, fuse)
    x_out, size_out, _ = txc.merge_tokens(x, size, merge_valid, dest, kept)
    return x_out, size_out, valid_out, dest, kept


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize(
    ("batch", "tokens", "keep", "protected", "ties"),
    [(2, 17, 0.7, 1, False), (3, 10, 0.5, 1, True), (2, 11, 0.25, 0, False), (1, 9, 0.34, 2, True),
     (2, 6, 0.9, 1, False), (2, 3, 0.7, 1, False), (1, 2, 0.001, 0, True), (2, 5, 1.0, 1, False)],
)  # fmt: skip
def test_matches_reference(batch, tokens, keep, protected, ties, fuse):
    x, size, score = _inputs(batch, tokens, seed=tokens * 7 + protected, ties=ties)
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    x_out, size_out, valid_out, dest, kept = _prune(x, size, valid, score, keep, protected, fuse)
    expect_len = protected + math.ceil(Fraction(str(keep)) * (tokens - protected)) + (fuse and keep < 1)
    assert pruned_length(tokens, keep, protected, fuse) == expect_len
    assert x_out.shape == (batch, expect_len, x.shape[2]) and kept.shape == (batch, expect_len)
    for b in range(batch):
        ref_x, ref_size, ref_source = reference_prune(x[b], size[b], score[b], keep, protected, fuse)
        n = ref_x.shape[0]
        assert valid_out[b].tolist() == [True] * n + [False] * (expect_len - n)  # a spare slot is padding
        torch.testing.assert_close(x_out[b, :n], ref_x)
        torch.testing.assert_close(size_out[b, :n], ref_size)
        assert dest[b].tolist() == ref_source
        assert kept[b, :protected].tolist() == list(range(protected))
    full = txc.unmerge_tokens(x_out, dest)  # each original token reads the slot that holds or stands for it
    assert full.shape == x.shape and torch.equal(full, x_out.gather(1, dest[..., None].expand_as(x)))


def test_keep_one_is_exactly_the_identity():
    x, size, score = _inputs(3, 10, seed=1, dtype=torch.float32)
    valid = torch.arange(10) < torch.tensor([[10], [6], [1]])
    for fuse in (True, False):
        x_out, size_out, valid_out, dest, kept = _prune(x, size, valid, score, 1.0, 1, fuse)
        assert torch.equal(x_out, x) and torch.equal(size_out, size) and torch.equal(valid_out, valid)
        assert torch.equal(dest, torch.arange(10).expand(3, 10)) and torch.equal(kept, dest)


def test_fused_token_by_hand():
    # CLS, then tokens scored 0.9, 0.1, 0.5, 0.2: keep=0.5 keeps 1 and 3; 2 and 4 are pruned.
    x = torch.tensor([[[5.0], [1.0], [10.0], [3.0], [40.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]])
    score = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.2]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    x_out, size_out, valid_out, dest, kept = _prune(x, size, valid, score, 0.5, 1, True)
    assert kept.tolist() == [[0, 1, 3, 2]] and dest.tolist() == [[0, 1, 3, 2, 3]] and valid_out.all()
    assert x_out.flatten().tolist() == [5.0, 1.0, 3.0, (3 * 10.0 + 40.0) / 4] and size_out.tolist() == [[1, 1, 1, 4]]
    # Without fusing, 2 and 4 vanish: they read their kept neighbours 1 and 3, which they leave unchanged.
    x_out, size_out, valid_out, dest, kept = _prune(x, size, valid, score, 0.5, 1, False)
    assert kept.tolist() == [[0, 1, 3]] and dest.tolist() == [[0, 1, 1, 2, 2]]
    assert x_out.flatten().tolist() == [5.0, 1.0, 3.0] and size_out.tolist() == [[1, 1, 1]]


def test_rows_that_prune_nothing_give_the_fused_slot_no_weight():
    # 3 tokens, 1 protected: ceil(0.7 * 2) = 2 keeps everything, yet T' = 4; the spare slot is padding.
    x, size, score = _inputs(2, 3, seed=2, dtype=torch.float32)
    valid = torch.ones(2, 3, dtype=torch.bool)
    x_out, size_out, valid_out, dest, kept = _prune(x, size, valid, score, 0.7, 1, True)
    assert valid_out.tolist() == [[True, True, True, False]] * 2 and torch.equal(x_out[:, :3], x)
    assert (size_bias(size_out, valid_out)[:, 0, 0, 3] == torch.finfo(torch.float32).min).all()
    # In a padded row the slot after the kept tokens holds padding: the first padding token, not a valid one.
    valid = torch.arange(8) < torch.tensor([[8], [3]])
    x, size, score = _inputs(2, 8, seed=3, dtype=torch.float32)
    _, _, valid_out, dest, kept = _prune(x, size, valid, score, 0.7, 1, True)
    assert valid_out[1].tolist() == [True] * 3 + [False] * 4 and kept[1, 3] == 3


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize(("keep", "protected", "fuse"), [(0.7, 1, True), (0.5, 1, False), (0.3, 0, True),
                                                          (0.6, 2, False)])  # fmt: skip
def test_padded_rows_prune_like_their_unpadded_sequences(keep, protected, fuse):
    lengths = [19, 16, 11, 5, 3, 2]
    batch, tokens = len(lengths), max(lengths)
    x, size, _ = _inputs(batch, tokens, seed=4)
    valid = torch.arange(tokens) < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~valid[..., None], float("nan"))  # padding content must never reach a valid token
    xb, sb, vb, source = x, size, valid, torch.arange(tokens).expand(batch, tokens)
    alone = [(x[b : b + 1, :n], size[b : b + 1, :n], valid[b : b + 1, :n], torch.arange(n)[None])
             for b, n in enumerate(lengths)]  # fmt: skip
    for block in range(3):
        score = _inputs(batch, xb.shape[1], seed=100 + block, ties=block == 1)[2]
        score = score.masked_fill(~vb, 5.0)  # high scores on padding must not matter
        xb, sb, vb, source = token_prune_step(xb, sb, vb, score, keep, protected, fuse, source)
        for b, n in enumerate(lengths):
            ax, asz, av, asrc = alone[b]
            # The row's valid tokens are the first slots of the batch: give them the same scores.
            alone[b] = ax, asz, av, asrc = token_prune_step(ax, asz, av, score[b : b + 1, : ax.shape[1]], keep,
                                                            protected, fuse, asrc)  # fmt: skip
            n_valid = int(av.sum())
            assert vb[b].tolist() == [True] * n_valid + [False] * (vb.shape[1] - n_valid)  # still right-padded
            torch.testing.assert_close(xb[b, :n_valid], ax[0, :n_valid])
            torch.testing.assert_close(sb[b, :n_valid], asz[0, :n_valid])
            assert torch.equal(source[b, :n], asrc[0])
    assert not xb[vb].isnan().any()


# ---------------------------------------------------------------- scores


def _qk(batch=2, heads=4, kv_heads=4, tokens=7, dim=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, dim, generator=g), torch.randn(batch, kv_heads, tokens, dim, generator=g)


@pytest.mark.parametrize("kind", ["none", "additive", "bool", "gqa"])
def test_attention_probs_are_what_sdpa_computes(kind):
    q, k = _qk(kv_heads=2 if kind == "gqa" else 4)
    batch, heads, tokens, _ = q.shape
    valid = torch.arange(tokens) < torch.tensor([[tokens], [4]])
    mask = None
    if kind == "bool":
        mask = valid[:, None, None, :].expand(batch, 1, tokens, tokens)
    elif kind == "additive":
        mask = torch.randn(batch, 1, tokens, tokens).masked_fill(~valid[:, None, None], -1e9)
    # SDPA with the identity as values returns the attention probabilities themselves.
    eye = torch.eye(tokens).expand(batch, heads, tokens, tokens)
    expect = F.scaled_dot_product_attention(q, k, eye, mask, scale=0.3, enable_gqa=kind == "gqa").mean(1)
    got = attention_probs(q, k, mask, 0.3, bool_mask=kind == "bool", groups=heads // k.shape[1])
    torch.testing.assert_close(got, expect)
    cls = attention_probs(q, k, mask, 0.3, bool_mask=kind == "bool", groups=heads // k.shape[1], first_query=True)
    torch.testing.assert_close(cls, expect[:, 0])


def test_pagerank_against_power_iteration_and_padding():
    q, k = _qk(tokens=9)
    valid = torch.arange(9) < torch.tensor([[9], [6]])
    probs = attention_probs(q, k, size_bias(torch.ones(2, 9), valid), 0.35)
    got = pagerank(probs, valid, 6)
    for b, n in enumerate((9, 6)):
        s = [1.0 / n] * n
        a = probs[b].tolist()
        for _ in range(6):
            s = [sum(a[i][j] * s[i] for i in range(n)) for j in range(n)]  # s_j = Σ_i A[i, j] s_i
        torch.testing.assert_close(got[b, :n], torch.tensor(s), atol=1e-6, rtol=1e-5)
        assert (got[b, n:] == 0).all()
    # The padded row ranks its tokens as the sequence alone does.
    alone = pagerank(attention_probs(q[1:, :, :6], k[1:, :, :6], None, 0.35), valid[1:, :6], 6)
    torch.testing.assert_close(got[1, :6], alone[0])


# ---------------------------------------------------------------- ops: schema, fake, export


def test_opcheck_and_bad_arguments():
    _, _, score = _inputs(2, 9, seed=6, dtype=torch.float32)
    valid = torch.arange(9) < torch.tensor([[9], [6]])
    for args in ((0.5, 1, True), (0.5, 0, False), (1.0, 1, True), (0.7, 2, True)):
        torch.library.opcheck(txc.prune_plan.default, (score, valid, *args))
    with pytest.raises(ValueError, match="keep must be"):
        txc.prune_plan(score, valid, 0.0, 1, True)
    with pytest.raises(ValueError, match="bool mask"):
        txc.prune_plan(score, valid.int(), 0.5, 1, True)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        txc.prune_plan(score[:, :5], valid, 0.5, 1, True)


class _TwoBlocks(torch.nn.Module):
    """Two toy attention blocks pruning after attention (EViT's score, then PageRank), with a per-token (unmerged)
    output and the pruned one."""

    def __init__(self, fuse, dim=8):
        super().__init__()
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.fuse = fuse

    def forward(self, x, valid):
        size, valid, source = init_token_state(x, valid)
        for qkv, cls in zip(self.qkv, (True, False)):
            q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
            bias = size_bias(size, valid, x.dtype)
            x = x + F.scaled_dot_product_attention(q, k, v, bias).transpose(1, 2).flatten(2)
            probs = attention_probs(q, k, bias, 0.5, first_query=cls)
            score = probs if cls else pagerank(probs, valid, 4)
            x, size, valid, source = token_prune_step(x, size, valid, score, 0.7, 1, self.fuse, source)
        return txc.unmerge_tokens(x, source), x


def test_export_keeps_a_symbolic_length_and_runs_at_other_sizes():
    fuse = True  # fuse=False is exported with a text model in tests/passes/test_token_prune.py
    model = _TwoBlocks(fuse).eval()
    auto = torch.export.Dim.AUTO
    x, valid = torch.randn(2, 13, 8), torch.ones(2, 13, dtype=torch.bool)
    ep = torch.export.export(model, (x, valid), dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}))
    pruned = [n.meta["val"][0].shape[1] for n in ep.graph.nodes if n.target == txc.merge_tokens.default]
    assert len(pruned) == 2 and all(isinstance(t, torch.SymInt) for t in pruned)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for batch, tokens in ((3, 20), (1, 6), (2, 3)):
        x2 = torch.randn(batch, tokens, 8)
        valid2 = torch.arange(tokens) < torch.randint(max(tokens - 3, 1), tokens + 1, (batch, 1))
        expect = model(x2, valid2)
        assert expect[1].shape[1] == pruned_length(pruned_length(tokens, 0.7, 1, fuse), 0.7, 1, fuse)
        for program in (ep, loaded):
            got = program.module()(x2, valid2)
            torch.testing.assert_close(got[0], expect[0])
            torch.testing.assert_close(got[1], expect[1])


def test_helpers_emit_aten_and_txc_nodes_on_fx_proxies():
    graph = torch.fx.Graph()
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    x, q, k = (torch.fx.Proxy(graph.placeholder(n), tracer) for n in ("x", "q", "k"))
    size, valid, source = init_token_state(x)
    score = pagerank(attention_probs(q, k, size_bias(size, valid), 0.5), valid, 3)
    out = token_prune_step(x, size, valid, score, 0.5, 1, True, source)
    graph.output((out[0].node, out[2].node, out[3].node))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert all(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes if n.op == "call_function"
               and n.target.__name__ != "getitem")  # fmt: skip
    xt, _, _ = _inputs(2, 7, seed=7, dtype=torch.float32)
    qt, kt = _qk(tokens=7)
    got = gm(xt, qt, kt)
    s, v, src = init_token_state(xt)
    expect = token_prune_step(
        xt, s, v, pagerank(attention_probs(qt, kt, size_bias(s, v), 0.5), v, 3), 0.5, 1, True, src
    )
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[2]) and torch.equal(got[2], expect[3])
