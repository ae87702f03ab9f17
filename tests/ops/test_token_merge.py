"""txc::bipartite_match / merge_tokens / unmerge_tokens against a loop-by-loop ToMe reference; padding, export."""

from __future__ import annotations

import io

import pytest
import torch

from txcompile.ops.token_merge import (
    init_token_state,
    merged_count,
    min_tokens,
    size_bias,
    token_merge_step,
)

txc = torch.ops.txc


# ---------------------------------------------------------------- reference: ToMe on one unpadded sequence, by loops


def reference_merge(x, size, metric, r, protected):
    """Bipartite soft matching on one sequence: x [T, C], size [T], metric [T, Ck].

    Returns (x_out [T', C], size_out [T'], source) where source[i] is the output slot holding original token i.
    """
    num = x.shape[0]
    if r <= 0:
        return x.clone(), size.clone(), list(range(num))
    set_a = [i for i in range(protected, num) if i % 2 == 0]
    set_b = [j for j in range(protected, num) if j % 2 == 1]
    r = min(r, len(set_a)) if set_b else 0

    unit = [metric[i] / metric[i].norm() for i in range(num)]
    best_score, best_b = {}, {}
    for i in set_a:
        for j in set_b:
            s = float(unit[i] @ unit[j])
            if i not in best_score or s > best_score[i]:  # strict: the first B token wins ties
                best_score[i], best_b[i] = s, j
    ranked = sorted(best_score, key=lambda i: -best_score[i])  # A tokens by position, stable: lower first on ties
    merged = set(ranked[:r])

    kept = list(range(min(protected, num))) + [i for i in set_a if i not in merged] + set_b
    members = {t: [t] for t in kept}
    for i in merged:
        members[best_b[i]].append(i)
    x_out, size_out = [], []
    for t in kept:
        total = sum(size[m] for m in members[t])
        x_out.append(sum(size[m] * x[m] for m in members[t]) / total)
        size_out.append(total)
    slot = {t: n for n, t in enumerate(kept)}
    source = [slot[t] if t in slot else slot[best_b[t]] for t in range(num)]
    return torch.stack(x_out), torch.stack(size_out), source


def _inputs(batch, tokens, seed, dtype=torch.float64, chans=6, key_chans=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, chans, generator=g, dtype=dtype)
    size = torch.randint(1, 5, (batch, tokens), generator=g).to(dtype)  # as after earlier merges
    metric = torch.randn(batch, tokens, key_chans, generator=g, dtype=dtype)
    return x, size, metric


def _merge(x, size, valid, metric, r, protected):
    dest, keep = txc.bipartite_match(metric, valid, r, protected)
    return (*txc.merge_tokens(x, size, valid, dest, keep), dest, keep)


# ---------------------------------------------------------------- counts


def test_merged_count_is_free_a_tokens_capped_by_r():
    for protected in range(4):
        for r in range(8):
            for tokens in range(20):
                free_a = [i for i in range(protected, tokens) if i % 2 == 0]
                free_b = [j for j in range(protected, tokens) if j % 2 == 1]
                expect = min(r, len(free_a)) if free_b else 0
                assert merged_count(tokens, r, protected) == expect, (tokens, r, protected)
            if r:
                assert merged_count(min_tokens(r, protected), r, protected) == r
                assert merged_count(min_tokens(r, protected) - 1, r, protected) < r


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    ("batch", "tokens", "r", "protected"),
    [(2, 9, 1, 1), (3, 10, 3, 1), (2, 11, 4, 0), (1, 8, 2, 2), (2, 7, 3, 2), (2, 6, 50, 0), (2, 9, 50, 1), (1, 5, 9, 2),
     (1, 3, 2, 2), (2, 2, 1, 0), (1, 1, 3, 0), (2, 12, 0, 1)],
)
def test_matches_reference(batch, tokens, r, protected):
    x, size, metric = _inputs(batch, tokens, seed=tokens * 31 + r)
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    x_out, size_out, valid_out, dest, keep = _merge(x, size, valid, metric, r, protected)
    kept = tokens - merged_count(tokens, r, protected)
    assert x_out.shape == (batch, kept, x.shape[2]) and keep.shape == (batch, kept)
    assert valid_out.all()
    for b in range(batch):
        ref_x, ref_size, ref_source = reference_merge(x[b], size[b], metric[b], r, protected)
        torch.testing.assert_close(x_out[b], ref_x)
        torch.testing.assert_close(size_out[b], ref_size)
        assert dest[b].tolist() == ref_source
        assert keep[b, : min(protected, tokens)].tolist() == list(range(min(protected, tokens)))  # protected in front
    # Unmerging restores the original count; each token gets the value of the token that absorbed it.
    full = txc.unmerge_tokens(x_out, dest)
    assert full.shape == x.shape
    assert torch.equal(full, x_out.gather(1, dest[..., None].expand_as(x)))


def test_two_blocks_compose_the_source_map():
    x, size, metric = _inputs(2, 13, seed=5)
    size, valid, source = init_token_state(x)
    h = x
    for r, seed in ((3, 1), (2, 2)):
        metric = _inputs(2, h.shape[1], seed=seed)[2]
        h, size, valid, source = token_merge_step(h, size, valid, metric, r, 1, source)
    assert h.shape[1] == 13 - 3 - 2 and source.shape == (2, 13)
    for b in range(2):  # the reference, block by block, composing its source maps by hand
        rh, rs, composed = x[b], torch.ones(13, dtype=torch.float32), list(range(13))
        for r, seed in ((3, 1), (2, 2)):
            metric = _inputs(2, rh.shape[0], seed=seed)[2]
            rh, rs, step = reference_merge(rh, rs, metric[b], r, 1)
            composed = [step[s] for s in composed]
        torch.testing.assert_close(h[b], rh)
        assert source[b].tolist() == composed
    # Total size is conserved: every original token is counted exactly once.
    torch.testing.assert_close(size.sum(1), torch.full((2,), 13.0))


def test_r_zero_is_exactly_the_identity():
    x, size, metric = _inputs(3, 10, seed=7, dtype=torch.float32)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 6:] = False
    x_out, size_out, valid_out, dest, keep = _merge(x, size, valid, metric, 0, 1)
    assert torch.equal(x_out, x) and torch.equal(size_out, size) and torch.equal(valid_out, valid)
    assert torch.equal(dest, torch.arange(10).expand(3, 10)) and torch.equal(keep, dest)


def test_size_weighted_average_by_hand():
    # Tokens 0, 2 (set A) and 1, 3 (set B). Token 2 is closest to 3 (cosine 1.0), token 0 to 1 (0.6).
    metric = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 2.0]]])
    x = torch.tensor([[[1.0], [2.0], [10.0], [20.0]]])
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    x1, s1, _, dest, keep = _merge(x, size, valid, metric, 1, 0)
    # 0 stays; B tokens 1, 3 follow; 2 merged into 3: (3·10 + 1·20) / 4 = 12.5.
    assert keep.tolist() == [[0, 1, 3]] and dest.tolist() == [[0, 1, 2, 2]]
    assert x1.flatten().tolist() == [1.0, 2.0, 12.5] and s1.flatten().tolist() == [1.0, 2.0, 4.0]
    # r = 2, both A tokens into token 1: (1·1 + 2·2 + 3·10) / 6, with metric making 1 the best match of both.
    metric2 = torch.tensor([[[1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [0.0, 1.0]]])
    x2, s2, _, dest2, keep2 = _merge(x, size, valid, metric2, 2, 0)
    assert keep2.tolist() == [[1, 3]] and dest2.tolist() == [[0, 0, 0, 1]]
    torch.testing.assert_close(x2.flatten(), torch.tensor([35.0 / 6.0, 20.0]))
    assert s2.flatten().tolist() == [6.0, 1.0]


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize(("r", "protected"), [(2, 1), (4, 0), (7, 1), (20, 2)])
def test_padded_rows_merge_like_their_unpadded_sequences(r, protected):
    lengths = [17, 16, 12, 9, 3, 1]  # 16: with r large, its only padding token is dropped into a valid slot
    batch, tokens = len(lengths), max(lengths)
    x, size, metric = _inputs(batch, tokens, seed=r)
    valid = torch.arange(tokens) < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~valid[..., None], float("nan"))  # padding content must never reach a valid token
    xb, sb, vb, source = x, size, valid, torch.arange(tokens).expand(batch, tokens)
    alone = [(x[b : b + 1, :n], size[b : b + 1, :n], valid[b : b + 1, :n], torch.arange(n)[None])
             for b, n in enumerate(lengths)]
    for block in range(2):
        metric = _inputs(batch, xb.shape[1], seed=100 + block)[2]
        xb, sb, vb, source = token_merge_step(xb, sb, vb, metric, r, protected, source)
        for b, n in enumerate(lengths):
            ax, asz, av, asrc = alone[b]
            # The row's valid tokens are the first slots of the batch: give them the same metric rows.
            alone[b] = ax, asz, av, asrc = token_merge_step(ax, asz, av, metric[b : b + 1, : ax.shape[1]], r,
                                                            protected, asrc)
            kept = ax.shape[1]
            assert vb[b].tolist() == [True] * kept + [False] * (vb.shape[1] - kept)  # still right-padded
            torch.testing.assert_close(xb[b, :kept], ax[0])
            torch.testing.assert_close(sb[b, :kept], asz[0])
            assert torch.equal(source[b, :n], asrc[0])
    assert not xb[vb].isnan().any()


def test_valid_tokens_never_merge_into_padding():
    x, size, metric = _inputs(1, 8, seed=3)
    metric[0, 5:] = metric[0, 2]  # padding identical to a valid token: the most similar pairs cross the boundary
    valid = torch.arange(8)[None] < 5
    x_out, size_out, valid_out, dest, keep = _merge(x, size, valid, metric, 3, 0)
    assert (valid.gather(1, keep) == valid_out).all()
    assert (valid_out.gather(1, dest) == valid).all()  # every valid token ends in a valid slot, padding in padding
    torch.testing.assert_close(size_out[valid_out].sum(), size[valid].sum())


def test_dropped_padding_has_no_weight():
    # T = 5 removes 3 tokens; the 4 valid ones can only lose their 2 A tokens (both into token 3), so the padding token
    # is dropped into the last slot, which is token 3's: it must not change that mean even holding NaN.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [float("nan")]]])
    valid = torch.arange(5)[None] < 4
    x_out, size_out, valid_out, dest, keep = _merge(x, torch.ones(1, 5), valid, metric, 3, 0)
    assert keep.tolist() == [[1, 3]] and dest.tolist() == [[1, 0, 1, 1, 1]] and valid_out.all()
    torch.testing.assert_close(x_out.flatten(), torch.tensor([2.0, 8.0 / 3.0]))
    assert size_out.flatten().tolist() == [1.0, 3.0]


def test_masks_that_cannot_absorb_the_merges_raise():
    x, size, metric = _inputs(1, 3, seed=4)
    valid = torch.tensor([[True, False, True]])  # valid A tokens with no valid B partner, one padding token
    with pytest.raises(ValueError, match="contiguous span"):
        txc.bipartite_match(metric, valid, 2, 0)


# ---------------------------------------------------------------- ops: schema, fake, gradients, export


def test_opcheck():
    x, size, metric = _inputs(2, 9, seed=8, dtype=torch.float32)
    valid = torch.arange(9) < torch.tensor([[9], [6]])
    dest, keep = txc.bipartite_match(metric, valid, 3, 1)
    torch.library.opcheck(txc.bipartite_match.default, (metric, valid, 3, 1))
    torch.library.opcheck(txc.bipartite_match.default, (metric, valid, 0, 0))
    torch.library.opcheck(txc.merge_tokens.default, (x.requires_grad_(), size, valid, dest, keep))
    torch.library.opcheck(txc.unmerge_tokens.default, (x[:, :6].detach().requires_grad_(), dest))
    torch.library.opcheck(txc.unmerge_tokens.default, (dest, dest))  # composing int64 source maps


def test_gradients_in_x():
    x, size, metric = _inputs(2, 7, seed=9)
    valid = torch.arange(7) < torch.tensor([[7], [5]])
    dest, keep = txc.bipartite_match(metric, valid, 2, 1)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: txc.merge_tokens(x, size, valid, dest, keep)[0], (x,))
    assert torch.autograd.gradcheck(lambda x: txc.unmerge_tokens(x, dest), (x[:, :5].detach().requires_grad_(),))


def test_half_precision_and_trailing_dims():
    x, size, metric = _inputs(2, 9, seed=10, dtype=torch.float32)
    x = x.to(torch.bfloat16).reshape(2, 9, 3, 2)
    valid = torch.ones(2, 9, dtype=torch.bool)
    x_out, size_out, _, dest, keep = _merge(x, size, valid, metric.to(torch.bfloat16), 3, 1)
    assert x_out.dtype == torch.bfloat16 and x_out.shape == (2, 6, 3, 2) and size_out.dtype == torch.float32
    assert txc.unmerge_tokens(x_out, dest).shape == x.shape


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="metric must be"):
        txc.bipartite_match(torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), 1, 0)
    with pytest.raises(ValueError, match="size must be"):
        txc.merge_tokens(torch.randn(2, 5, 3), torch.ones(2, 4), torch.ones(2, 5, dtype=torch.bool),
                         torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))


def test_size_bias_is_log_size_on_valid_keys():
    size = torch.tensor([[1.0, 3.0, 2.0], [4.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    bias = size_bias(size, valid, torch.bfloat16)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.bfloat16
    torch.testing.assert_close(bias[:, 0, 0][valid], size.log()[valid].to(torch.bfloat16))
    assert bias[1, 0, 0, 2] == torch.finfo(torch.bfloat16).min


class _TwoBlocks(torch.nn.Module):
    """Two toy blocks with token merging between attention and MLP, and a per-token output (unmerged)."""

    def __init__(self, dim=8, r=2, protected=1):
        super().__init__()
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2))
        self.r, self.protected = r, protected

    def forward(self, x, valid):
        size, valid, source = init_token_state(x, valid)
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).chunk(3, dim=-1)
            bias = size_bias(size, valid, x.dtype)
            x = x + torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], bias)[:, 0]
            x, size, valid, source = token_merge_step(x, size, valid, k, self.r, self.protected, source)
            x = x + mlp(x)
        return txc.unmerge_tokens(x, source), x[:, 0]


def test_export_with_dynamic_batch_and_tokens_saves_and_loads():
    model = _TwoBlocks().eval()
    auto = torch.export.Dim.AUTO
    x, valid = torch.randn(2, 11, 8), torch.ones(2, 11, dtype=torch.bool)
    ep = torch.export.export(model, (x, valid), dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    for op in (txc.bipartite_match.default, txc.merge_tokens.default, txc.unmerge_tokens.default):
        assert op in targets
    last_merge = [n for n in ep.graph.nodes if n.target == txc.merge_tokens.default][-1]
    assert str(last_merge.meta["val"][0].shape[1]).endswith("- 4")  # T - r - r: linear in the symbolic T

    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for batch, tokens in ((3, 14), (1, 9)):  # other B and T, odd and even
        x2 = torch.randn(batch, tokens, 8)
        valid2 = torch.arange(tokens) < torch.randint(tokens - 2, tokens + 1, (batch, 1))
        expect = model(x2, valid2)
        for program in (ep, loaded):
            got = program.module()(x2, valid2)
            torch.testing.assert_close(got[0], expect[0])
            torch.testing.assert_close(got[1], expect[1])


def test_helpers_emit_aten_and_txc_nodes_on_fx_proxies():
    graph = torch.fx.Graph()
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    x, metric = (torch.fx.Proxy(graph.placeholder(n), tracer) for n in ("x", "metric"))
    size, valid, source = init_token_state(x)
    out = token_merge_step(x, size, valid, metric, 2, 1, source)
    bias = size_bias(out[1], out[2])
    graph.output((out[0].node, out[3].node, bias.node))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert all(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes if n.op == "call_function"
               and n.target.__name__ != "getitem")
    xt, _, mt = _inputs(2, 9, seed=11, dtype=torch.float32)
    got = gm(xt, mt)
    s, v, src = init_token_state(xt)
    expect = token_merge_step(xt, s, v, mt, 2, 1, src)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[3])
    assert torch.equal(got[2], size_bias(expect[1], expect[2]))
