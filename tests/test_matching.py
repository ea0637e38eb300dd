import functools

import pytest
import torch
import torch.nn.functional as F

import hetmm.core.matching as matching
from hetmm.core.layout import to_pixel_major
from hetmm.core.matching import match_layer, match_layer_pair, nearest_patch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def _unit(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _reference(query, templates, k_f, k_b):
    """Literal transcription of the official kernels plus max over sheets (slow, for tests)."""
    q, t = query.double().tolist(), templates.double().tolist()
    b_, c_, h_, w_ = query.shape
    n_ = templates.shape[0]

    def dot(i, y, x, n, ty, tx):
        return sum(q[i][c][y][x] * t[n][c][ty][tx] for c in range(c_))

    def kernel(k, forward):
        if k == 0:
            return None
        out = torch.empty(b_, h_, w_, dtype=torch.float64)
        d = k // 2
        for i in range(b_):
            for y in range(h_):
                for x in range(w_):
                    best = -1e30
                    for n in range(n_):
                        for dy in range(-d, d + 1):
                            for dx in range(-d, d + 1):
                                yy, xx = y + dy, x + dx
                                if not (0 <= yy < h_ and 0 <= xx < w_):
                                    continue  # border truncation: the offset is skipped
                                if forward:  # <Q(p), T_n(p+δ)>
                                    s = dot(i, y, x, n, yy, xx)
                                else:  # <Q(p+δ), T_n(p)>
                                    s = dot(i, yy, xx, n, y, x)
                                best = max(best, s)
                    out[i, y, x] = 1.0 - best
        return out

    return kernel(k_f, True), kernel(k_b, False)


# Non-square grid; B=4 with k=5 gives 100 window rows (the tall matmul path), B=2 the short one;
# N=40 exercises the ragged max over sheets.
CASES = {
    "B2N3": dict(b=2, n=3, c=5, h=5, w=7),
    "B1N1": dict(b=1, n=1, c=4, h=6, w=4),
    "B4N40": dict(b=4, n=40, c=3, h=4, w=5),
    "B2N2small": dict(b=2, n=2, c=6, h=5, w=6),  # windows wider than the map (the crash)
    "B1N2row": dict(b=1, n=2, c=3, h=1, w=4),  # a single row
    "B1N1pixel": dict(b=1, n=1, c=3, h=1, w=1),  # a single pixel
}


@functools.cache
def _case(name, k_f, k_b):
    s = CASES[name]
    query = _unit(s["b"], s["c"], s["h"], s["w"], seed=1)
    templates = _unit(s["n"], s["c"], s["h"], s["w"], seed=2)
    return query, templates, _reference(query, templates, k_f, k_b)


def _assert_close(got, want, tol):
    if want is None:
        assert got is None
        return
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double().cpu() - want).abs().max().item() < tol


WINDOWS = [(5, 3), (3, 5), (1, 1), (7, 1), (3, 0), (0, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("windows", WINDOWS)
@pytest.mark.parametrize("chunk", [None, 1, 3, 10_000])
def test_match_layer_equals_official_kernels(device, dtype, windows, chunk):
    query, templates, (want_f, want_b) = _case("B2N3", *windows)
    forward, backward = match_layer(
        query.to(device, dtype), templates.to(device, dtype), *windows, chunk=chunk
    )
    _assert_close(forward, want_f, TOL[dtype])
    _assert_close(backward, want_b, TOL[dtype])


# Windows wider than the map (the case, a single row, a single pixel) must truncate at the border like the kernels.
WIDE = [("B2N2small", w) for w in [(13, 7), (7, 13), (9, 0), (0, 11), (13, 13)]] + \
    [(case, (13, 7)) for case in ("B1N2row", "B1N1pixel")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,windows", [(c, w) for c in ("B1N1", "B4N40") for w in [(5, 3), (3, 5), (1, 1)]] + WIDE)
@pytest.mark.parametrize("chunk", [None, 2, 5])
def test_match_layer_single_sheet_wide_batches_and_wide_windows(device, case, windows, chunk):
    query, templates, (want_f, want_b) = _case(case, *windows)
    forward, backward = match_layer(query.to(device), templates.to(device), *windows, chunk=chunk)
    _assert_close(forward, want_f, 1e-6)
    _assert_close(backward, want_b, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_windows_equal_the_whole_map_window_without_a_huge_band(device):
    query, templates, (want_f, want_b) = _case("B2N2small", 13, 13)  # 13 already covers the 5 x 6 map
    forward, backward = match_layer(query.to(device), templates.to(device), 100_001, 99_999)
    _assert_close(forward, want_f, 1e-6)
    _assert_close(backward, want_b, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_border_is_truncated_not_zero_padded(device):
    # Every similarity is negative, so a zero-padded neighbour (similarity 0) would win at the border.
    g = torch.Generator().manual_seed(3)
    query = F.normalize(torch.rand(2, 4, 5, 6, generator=g, dtype=torch.float64) + 0.1, dim=1)
    templates = -F.normalize(torch.rand(3, 4, 5, 6, generator=g, dtype=torch.float64) + 0.1, dim=1)
    forward, backward = match_layer(query.to(device), templates.to(device), 5, 3)
    want_f, want_b = _reference(query, templates, 5, 3)
    _assert_close(forward, want_f, 1e-6)
    _assert_close(backward, want_b, 1e-6)
    assert forward.min() > 1.0 and backward.min() > 1.0  # 1 - (negative similarity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("windows", [(5, 3), (1, 1), (3, 7)])
def test_query_equal_to_a_template_matches_itself_everywhere(device, windows):
    templates = _unit(4, 16, 9, 11, seed=4).to(device)
    query = templates[[2, 0]]
    forward, backward = match_layer(query, templates, *windows)
    assert forward.abs().max() < 1e-6 and backward.abs().max() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_template_memory_layout_does_not_change_results(device):
    query = _unit(3, 6, 7, 5, seed=5).to(device)
    templates = _unit(4, 6, 7, 5, seed=6).to(device)
    pixel_major = to_pixel_major(templates)
    assert torch.equal(pixel_major, templates)
    assert pixel_major.permute(2, 3, 0, 1).is_contiguous()
    want = match_layer(query, templates, 5, 3)
    for layout in (pixel_major, templates.contiguous(memory_format=torch.channels_last)):
        got = match_layer(query, layout, 5, 3, chunk=4)
        assert torch.allclose(got[0], want[0], atol=1e-12)
        assert torch.allclose(got[1], want[1], atol=1e-12)


def test_even_window_uses_half_width_k_over_2_like_the_official_kernels():
    query, templates = _unit(2, 4, 6, 6, seed=7), _unit(3, 4, 6, 6, seed=8)
    even, odd = match_layer(query, templates, 4, 2), match_layer(query, templates, 5, 3)
    assert torch.equal(even[0], odd[0]) and torch.equal(even[1], odd[1])


def test_half_precision_templates_are_computed_in_float32_on_cpu():
    query, templates = _unit(2, 8, 6, 5, seed=9), _unit(3, 8, 6, 5, seed=10)
    half = match_layer(query.half(), templates.half(), 3, 3)
    full = match_layer(query.half().float(), templates.half().float(), 3, 3)
    assert half[0].dtype == torch.float32
    assert torch.allclose(half[0], full[0]) and torch.allclose(half[1], full[1])


def test_no_window_means_no_work_and_bad_arguments_are_rejected():
    query, templates = _unit(1, 4, 5, 5, seed=11), _unit(2, 4, 5, 5, seed=12)
    assert match_layer(query, templates, 0, 0) == (None, None)
    with pytest.raises(ValueError, match="forward_window"):
        match_layer(query, templates, -1, 3)
    with pytest.raises(ValueError, match="chunk"):
        match_layer(query, templates, 3, 3, chunk=0)
    with pytest.raises(ValueError, match="equal C, H, W"):
        match_layer(query, templates[:, :, :4], 3, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_nearest_patch_equals_brute_force(device, chunk):
    query = _unit(2, 5, 6, 7, seed=13)
    templates = _unit(3, 5, 4, 3, seed=14)  # any grid: positions are ignored
    q = query.permute(0, 2, 3, 1).reshape(-1, 5)
    t = templates.permute(0, 2, 3, 1).reshape(-1, 5)
    want = torch.tensor(
        [1.0 - max(float(qi @ tj) for tj in t) for qi in q], dtype=torch.float64
    ).view(2, 6, 7)
    got = nearest_patch(query.to(device), templates.to(device), chunk=chunk)
    _assert_close(got, want, 1e-6)


def test_nearest_patch_is_at_most_any_windowed_distance():
    query, templates = _unit(2, 6, 8, 8, seed=15), _unit(5, 6, 8, 8, seed=16)
    patch = nearest_patch(query, templates)
    forward, _ = match_layer(query, templates, 7, 0)
    assert (patch <= forward + 1e-6).all()


def _per_offset(query, templates, k_f, k_b):
    """Vectorised restatement of the kernels: one shifted product per offset, -inf outside."""
    b, _, h, w = query.shape
    d = max(k_f, k_b) // 2
    pad_q = F.pad(query, (d, d, d, d))
    pad_t = F.pad(templates, (d, d, d, d))
    inside = F.pad(torch.ones(h, w, dtype=torch.bool), (d, d, d, d))
    forward = torch.full((b, h, w), -torch.inf, dtype=query.dtype)
    backward = forward.clone()
    for dy in range(-d, d + 1):
        for dx in range(-d, d + 1):
            rows, cols = slice(d + dy, d + dy + h), slice(d + dx, d + dx + w)
            valid = inside[rows, cols]
            if max(abs(dy), abs(dx)) <= k_f // 2:  # <Q(p), T_n(p+δ)>
                sim = torch.einsum("bchw,nchw->bnhw", query, pad_t[:, :, rows, cols]).amax(1)
                forward = torch.maximum(forward, sim.masked_fill(~valid, -torch.inf))
            if max(abs(dy), abs(dx)) <= k_b // 2:  # <Q(p+δ), T_n(p)>
                sim = torch.einsum("bchw,nchw->bnhw", pad_q[:, :, rows, cols], templates).amax(1)
                backward = torch.maximum(backward, sim.masked_fill(~valid, -torch.inf))
    return 1 - forward, 1 - backward


@pytest.mark.parametrize("windows", [(7, 3), (3, 5)])
@pytest.mark.parametrize("chunk", [None, 60, 7])  # 60: blocks of 2-3 whole rows; 7: row pieces
def test_match_layer_on_a_larger_grid_equals_the_per_offset_formulation(windows, chunk):
    query, templates = _unit(8, 8, 20, 18, seed=17), _unit(13, 8, 20, 18, seed=18)
    want_f, want_b = _per_offset(query, templates, *windows)
    forward, backward = match_layer(query, templates, *windows, chunk=chunk)
    _assert_close(forward, want_f, 1e-6)
    _assert_close(backward, want_b, 1e-6)


@pytest.mark.parametrize("windows", WINDOWS + [(9, 9)])
@pytest.mark.parametrize("sizes", [(2, 3), (4, 5), (5, 1)])  # (B, N): B=4, 5 with k=5 take the tall matmul path
@pytest.mark.parametrize("chunk", [None, 3])
def test_pair_gives_both_directions_from_one_product(windows, sizes, chunk):
    """match_layer_pair's second result is the templates matched against the query batch (the issue-26 leave-one-out
    reuse), and ``exclude`` equals matching without the left-out sheet, in both directions."""
    (b, n), (k_f, k_b) = sizes, windows
    query, templates = _unit(b, 6, 5, 7, seed=21, dtype=torch.float32), _unit(n, 6, 5, 7, seed=22, dtype=torch.float32)
    mine, theirs = match_layer_pair(query, templates, k_f, k_b, chunk=chunk)
    expected = (match_layer(query, templates, k_f, k_b), match_layer(templates, query, k_f, k_b))
    for got, want in zip((mine, theirs), expected, strict=True):
        for g, w in zip(got, want, strict=True):
            _assert_close(g, None if w is None else w.double(), 1e-6)
    exclude = torch.tensor([(i * 2) % n if i % 3 else -1 for i in range(b)])
    mine, theirs = match_layer_pair(query, templates, k_f, k_b, chunk=chunk, exclude=exclude)
    alone = match_layer(query, templates, k_f, k_b, chunk=chunk, exclude=exclude)
    for i in range(b):
        keep = [s for s in range(n) if s != exclude[i]]
        want = match_layer(query[i : i + 1], templates[keep], k_f, k_b) if keep else (None, None)
        for g, a, w in zip(mine, alone, want, strict=True):
            if g is not None:
                expected = w[0] if keep else torch.full_like(g[i], float("inf"))  # no sheet left: the min's neutral
                assert torch.equal(g[i], a[i]) and torch.allclose(g[i], expected, atol=1e-6)
    for s in range(n):
        keep = [i for i in range(b) if exclude[i] != s]
        if keep:
            for g, w in zip(theirs, match_layer(templates[s : s + 1], query[keep], k_f, k_b), strict=True):
                assert (g is None) == (w is None) and (g is None or torch.allclose(g[s], w[0], atol=1e-6))


def test_pair_combines_query_groups_of_a_small_band_budget(monkeypatch):
    """Query images split into groups (the band-table budget) still give the swapped direction over all of them."""
    query, templates = _unit(7, 4, 6, 6, seed=23, dtype=torch.float32), _unit(3, 4, 6, 6, seed=24, dtype=torch.float32)
    want = match_layer(templates, query, 5, 3)
    monkeypatch.setattr(matching, "_BAND_BYTES", (6 * 6 * 25 * 4 * 2, 1 << 30))  # two query images per group
    _, theirs = match_layer_pair(query, templates, 5, 3)
    for g, w in zip(theirs, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
    with pytest.raises(ValueError, match="one sheet index per query"):
        match_layer(query, templates, 3, 3, exclude=torch.tensor([0]))
