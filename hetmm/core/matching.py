"""Forward / backward template matching inside windows, and the nearest-patch ablation.

Pure tensor maths on the inputs' device. Features are L2-normalised over channels, so every dot
product is a cosine similarity; maps are returned as ``1 - max similarity`` in float32.

The official CUDA kernels compute, for windows of half-width ``d = k // 2`` truncated at the
border (out-of-grid offsets are skipped, never zero-padded)::

    F(p) = max_n max_{|δ|∞ <= d_f, p+δ inside} <Q(p), T_n(p+δ)>     forward:  query -> template
    B(p) = max_n max_{|δ|∞ <= d_b, p+δ inside} <Q(p+δ), T_n(p)>     backward: template -> query

Both are band reductions of one table ``G(a, b) = max_n <Q(a), T_n(b)>`` (query pixel ``a``,
template pixel ``b``): ``F(a) = max_{|b-a| <= d_f} G(a, b)`` and ``B(b) = max_{|a-b| <= d_b} G(a, b)``.
So a single pass over the larger window gives both maps. For every template pixel ``b`` the query
window around it (``k² · B`` rows) is multiplied by ``T(b)`` (``[C, N]``) in one batched matmul over
pixels, which keeps the arithmetic intensity of a GEMM instead of ``k²`` skinny per-offset products.

The same table read the other way round serves the swapped pair: with the query batch as sheets and the templates
as queries, ``G'(a, b) = G(b, a)`` (maximised over the query images instead of the sheets), so the templates' forward
distances are the backward reduction of ``G'``'s band and their backward distances its forward reduction.
:func:`match_layer_pair` returns both directions from one product (what leave-one-out calibration uses to match each
pair of training images once), and ``exclude`` leaves one sheet out per query image (-inf before the maxima).

Memory is bounded by chunking template pixels (``chunk``) and, for the band table ``[k², B, H·W]``,
query images. With ``chunk=None`` a step's unfolded query windows, template rows and product take
about 16 MiB on CPU and 256 MiB on accelerators, and the band table is capped at 64 MiB on CPU and
1 GiB on accelerators. The CPU step stays within the last-level cache, yet is large enough that a
call makes few parallel regions: each costs a thread wake-up, which on a loaded machine can take
milliseconds, and 4 MiB steps measured no faster on a quiet one.

Products are computed in the templates' dtype, except that float16/bfloat16 use float32 on CPU
(no fast reduced-precision CPU matmul). Templates are read per pixel as ``[N, C]`` rows. Pass them in pixel-major memory
(:func:`hetmm.core.layout.to_pixel_major`, as saved template files are) to make that a view; any other
layout works but is re-laid out chunk by chunk on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetmm.core.layout import pixel_rows

# Automatic chunking, in bytes of intermediates: (CPU, accelerator).
_STEP_BYTES = (16 << 20, 256 << 20)  # one matmul step: query windows + template rows + product
_BAND_BYTES = (64 << 20, 1 << 30)  # band table per group of query images
# Columns (template vectors) per nearest-patch step.
_PATCH_COLUMNS = 512
# Window rows (k²·B) from which sheets-as-rows products are faster: MKL runs [N, C] x [C, k²·B]
# better for tall windows, and the max over sheets then reduces long contiguous rows.
_TALL_WINDOW = 96
# torch's CPU max-reduction vectorises the innermost dim in blocks of 32; fold to a multiple of it.
_REDUCE_BLOCK = 32


def match_layer(
    query: torch.Tensor,
    templates: torch.Tensor,
    forward_window: int,
    backward_window: int,
    *,
    chunk: int | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Forward and backward matching distances of one layer (official kernels + max over sheets).

    Args:
        query: [B, C, H, W], L2-normalised over C.
        templates: [N, C, H, W], L2-normalised over C, same device (and dtype family) as ``query``.
        forward_window: k_f >= 0; the window is (2·(k_f//2)+1)², 1 = position-aligned, 0 = skip.
        backward_window: k_b >= 0, as ``forward_window``.
        chunk: template pixels per matmul step; None picks it from a memory budget.
        exclude: [B] int, the sheet left out of query ``i``'s maxima (-1: none); a query whose only sheet is
            left out gets +inf distances (the neutral element of a minimum over sheet blocks).

    Returns:
        (forward, backward): each [B, H, W] float32 ``1 - max cosine similarity``, or None for a
        direction whose window is 0.
    """
    return _match(query, templates, forward_window, backward_window, chunk, exclude, pair=False)[0]


def match_layer_pair(
    query: torch.Tensor,
    templates: torch.Tensor,
    forward_window: int,
    backward_window: int,
    *,
    chunk: int | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Both directions of one layer from one product: the queries against the templates, and the templates (as
    queries) against the query batch (as sheets).

    Args: as :func:`match_layer`; ``exclude[i] = n`` leaves out the pair (query ``i``, sheet ``n``) in both
    directions. ``query`` and ``templates`` must have equal C, H, W.

    Returns:
        ((forward, backward) [B, H, W], (forward, backward) [N, H, W]): the second pair equals
        ``match_layer(templates, query, ...)`` up to float rounding, at the cost of one direction.
    """
    return _match(query, templates, forward_window, backward_window, chunk, exclude, pair=True)


def _match(query: torch.Tensor, templates: torch.Tensor, forward_window: int, backward_window: int,
           chunk: int | None, exclude: torch.Tensor | None, pair: bool):
    _check_pair(query, templates)
    for name, k in (("forward_window", forward_window), ("backward_window", backward_window)):
        if k < 0:
            raise ValueError(f"{name} must be >= 0, got {k}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 template pixels, got {chunk}")
    if exclude is not None and tuple(exclude.shape) != (query.shape[0],):
        raise ValueError(f"exclude must have one sheet index per query image, got shape {tuple(exclude.shape)}")
    if forward_window == 0 and backward_window == 0:
        return (None, None), (None, None)

    dtype = _compute_dtype(templates)
    b, _, h, w = query.shape
    n = templates.shape[0]
    # Half-widths; -1 marks a direction that is off. Offsets beyond the map are always outside the grid, so a
    # half-width above max(H, W) - 1 adds nothing: clamping keeps huge windows from allocating a huge band table.
    reach = max(h, w) - 1
    d_f = min(forward_window // 2, reach) if forward_window else -1
    d_b = min(backward_window // 2, reach) if backward_window else -1
    d = max(d_f, d_b)
    itemsize = torch.finfo(dtype).bits // 8
    group = max(1, _bytes(query.device, _BAND_BYTES) // ((2 * d + 1) ** 2 * h * w * itemsize))

    rows = pixel_rows(templates.to(dtype))
    forward_maps, backward_maps = [], []
    swapped: torch.Tensor | None = None  # [(2d+1)², N, H·W] band of the templates as queries
    for start in range(0, b, group):
        part = None if exclude is None else exclude[start : start + group]
        band, other = _band(query[start : start + group].to(dtype), rows, h, w, d, chunk, part, pair)
        if d_f >= 0:
            forward_maps.append(_forward_from_band(band, h, w, d, d_f))
        if d_b >= 0:
            backward_maps.append(_backward_from_band(band, d, d_b))
        if other is not None:
            swapped = other if swapped is None else torch.maximum(swapped, other, out=swapped)
    forward = _distance(torch.cat(forward_maps)).view(b, h, w) if d_f >= 0 else None
    backward = _distance(torch.cat(backward_maps)).view(b, h, w) if d_b >= 0 else None
    if swapped is None:
        return (forward, backward), (None, None)
    # The templates' forward distances reduce the swapped band like a backward map, and vice versa.
    forward_t = _distance(_backward_from_band(swapped, d, d_f)).view(n, h, w) if d_f >= 0 else None
    backward_t = _distance(_forward_from_band(swapped, h, w, d, d_b)).view(n, h, w) if d_b >= 0 else None
    return (forward, backward), (forward_t, backward_t)


def nearest_patch(
    query: torch.Tensor, templates: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """PatchCore-like ablation: distance to the most similar template vector anywhere.

    Args:
        query: [B, C, H, W], L2-normalised over C.
        templates: [N, C, h, w], L2-normalised over C (any grid; positions are ignored).
        chunk: template pixels (each N vectors) per matmul step; None picks it from a budget.

    Returns:
        [B, H, W] float32 ``1 - max over all template positions and sheets`` of cosine similarity.
    """
    if query.dim() != 4 or templates.dim() != 4 or query.shape[1] != templates.shape[1]:
        raise ValueError(
            f"expected query [B,C,H,W] and templates [N,C,h,w] with equal C, got "
            f"{tuple(query.shape)} and {tuple(templates.shape)}"
        )
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 template pixels, got {chunk}")
    dtype = _compute_dtype(templates)
    b, c, h, w = query.shape
    n = templates.shape[0]
    itemsize = torch.finfo(dtype).bits // 8

    q = query.to(dtype).permute(0, 2, 3, 1).reshape(b * h * w, c)
    rows = pixel_rows(templates.to(dtype))
    pixels = rows.shape[0]
    step = chunk or max(1, min(pixels, -(-_PATCH_COLUMNS // n)))
    row_block = max(1, _bytes(query.device, _STEP_BYTES) // (step * n * itemsize))
    best = torch.full((q.shape[0],), float("-inf"), dtype=dtype, device=q.device)
    for p0 in range(0, pixels, step):
        t = rows[p0 : p0 + step].reshape(-1, c)  # [P·N, C]
        for r0 in range(0, q.shape[0], row_block):
            sim = _row_max(q[r0 : r0 + row_block] @ t.T)
            torch.maximum(best[r0 : r0 + row_block], sim, out=best[r0 : r0 + row_block])
    return _distance(best).view(b, h, w)


def _check_pair(query: torch.Tensor, templates: torch.Tensor) -> None:
    if query.dim() != 4 or templates.dim() != 4 or query.shape[1:] != templates.shape[1:]:
        raise ValueError(
            f"expected query [B,C,H,W] and templates [N,C,H,W] with equal C, H, W, got "
            f"{tuple(query.shape)} and {tuple(templates.shape)}"
        )
    if query.device != templates.device:
        raise ValueError(f"query on {query.device} but templates on {templates.device}")


def _compute_dtype(templates: torch.Tensor) -> torch.dtype:
    # Reduced precision has no fast CPU matmul; accelerators compute in the template dtype.
    if templates.device.type == "cpu" and templates.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return templates.dtype


def _bytes(device: torch.device, budget: tuple[int, int]) -> int:
    return budget[0] if device.type == "cpu" else budget[1]


def _distance(similarity: torch.Tensor) -> torch.Tensor:
    """1 - similarity as float32, subtracting in at least float32 (half loses 1 - s near s = 1)."""
    wide = torch.promote_types(similarity.dtype, torch.float32)
    return (1.0 - similarity.to(wide)).float()


def _row_max(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Max over the last dim, [..., L] -> [...], optionally into ``out``.

    Folds L onto a multiple of ``_REDUCE_BLOCK`` with one overlapping elementwise max (max is
    idempotent, so the overlap is harmless); torch reduces a ragged tail of the innermost dim
    element by element, which costs more than the matmul that produced it for small C.
    """
    length = x.shape[-1]
    if length > _REDUCE_BLOCK and length % _REDUCE_BLOCK:
        half = -(-length // (2 * _REDUCE_BLOCK)) * _REDUCE_BLOCK
        x = torch.maximum(x[..., :half], x[..., length - half :])
    return torch.amax(x, -1, out=out)


def _outside(h: int, w: int, d: int, device: torch.device) -> torch.Tensor:
    """True where pixel + offset leaves the grid.

    Returns:
        [(2d+1)², 1, H·W] bool, broadcastable over the query batch.
    """
    k = 2 * d + 1
    delta = torch.arange(-d, d + 1, device=device)
    ys = torch.arange(h, device=device).view(1, h, 1) + delta.view(k, 1, 1)
    xs = torch.arange(w, device=device).view(1, 1, w) + delta.view(k, 1, 1)
    bad_y = (ys < 0) | (ys >= h)  # [k, H, 1]
    bad_x = (xs < 0) | (xs >= w)  # [k, 1, W]
    bad = bad_y.view(k, 1, h, 1) | bad_x.view(1, k, 1, w)
    return bad.view(k * k, 1, h * w)


def _band(
    query: torch.Tensor, rows: torch.Tensor, h: int, w: int, d: int, chunk: int | None,
    exclude: torch.Tensor | None = None, pair: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Band table of max-over-sheets similarities, and with ``pair`` the one of max-over-queries similarities.

    Args:
        query: [B, C, H, W] in the compute dtype.
        rows: [H·W, N, C] template rows per pixel.
        exclude: [B] sheet index left out per query image (-1: none), or None.

    Returns:
        [(2d+1)², B, H·W]: entry (δ, i, b) = max_n <Q_i(b+δ), T_n(b)>, -inf where b+δ is outside; with ``pair``
        also [(2d+1)², N, H·W]: entry (δ, n, b) = max_i <Q_i(b+δ), T_n(b)> (else None). Left-out pairs are -inf.
    """
    b, c = query.shape[:2]
    n = rows.shape[1]
    k = 2 * d + 1
    m = k * k * b  # matmul rows per template pixel: the query window of every image
    itemsize = torch.finfo(query.dtype).bits // 8
    step = chunk or _bytes(query.device, _STEP_BYTES) // (itemsize * (m * (n + c) + n * c))
    step = max(1, min(step, h * w))
    left_out = None
    if exclude is not None:
        exclude = exclude.to(query.device, torch.long)
        mine = torch.nonzero((exclude >= 0) & (exclude < n)).flatten()
        left_out = (mine, exclude[mine]) if mine.numel() else None

    # Zero-padded channels-last query: a window row (dx, image, channel) is one contiguous run,
    # so each pixel's window [k, k·B·C] is a strided view and unfolding is a plain block copy.
    padded = F.pad(query, (d, d, d, d)).permute(2, 3, 0, 1).contiguous()
    windows = (
        padded.view(h + 2 * d, -1).unfold(1, k * b * c, b * c).unfold(0, k, 1).permute(0, 1, 3, 2)
    )  # [H, W, k, k·B·C]
    tall = m >= _TALL_WINDOW
    window_buf = query.new_empty(step, m, c)
    product_buf = query.new_empty((step, n, m) if tall else (step, m, n))
    band = query.new_empty(h * w, m)
    swapped = query.new_empty(h * w, k * k, n) if pair else None
    for y0, y1, x0, x1 in _blocks(h, w, step):
        p0, p1 = y0 * w + x0, (y1 - 1) * w + x1
        window, product = window_buf[: p1 - p0], product_buf[: p1 - p0]
        window.view(y1 - y0, x1 - x0, k, k * b * c).copy_(windows[y0:y1, x0:x1])
        sheets = rows[p0:p1]
        if sheets.stride(-1) != 1:  # NCHW templates: re-lay this chunk out (bmm would go slowly)
            sheets = sheets.contiguous()
        if tall:  # [P, N, C] x [P, C, k²·B], max over the sheet rows
            torch.bmm(sheets, window.transpose(1, 2), out=product)
            by_image = product.view(p1 - p0, n, k * k, b)  # (pixel, sheet, offset, image)
            if left_out is not None:
                by_image[:, left_out[1], :, left_out[0]] = float("-inf")
            torch.amax(product, 1, out=band[p0:p1])
            if pair:
                swapped[p0:p1].copy_(by_image.amax(3).transpose(1, 2))
        else:  # [P, k²·B, C] x [P, C, N], max over the sheet columns
            torch.bmm(window, sheets.transpose(1, 2), out=product)
            by_image = product.view(p1 - p0, k * k, b, n)  # (pixel, offset, image, sheet)
            if left_out is not None:
                by_image[:, :, left_out[0], left_out[1]] = float("-inf")
            _row_max(product, out=band[p0:p1])
            if pair:
                torch.amax(by_image, 2, out=swapped[p0:p1])
    outside = _outside(h, w, d, query.device)
    band = band.view(h * w, k * k, b).permute(1, 2, 0).contiguous().masked_fill_(outside, float("-inf"))
    if pair:
        swapped = swapped.permute(1, 2, 0).contiguous().masked_fill_(outside, float("-inf"))
    return band, swapped


def _blocks(h: int, w: int, step: int) -> list[tuple[int, int, int, int]]:
    """Template-pixel blocks (y0, y1, x0, x1) of at most ``step`` pixels: whole rows or row pieces.

    Blocks differ in size by at most a row (or a pixel): a ragged last block would be a small,
    badly balanced matmul.
    """
    if step >= w:
        ys = _even_split(h, -(-h // (step // w)))
        return [(y0, y1, 0, w) for y0, y1 in zip(ys, ys[1:])]
    xs = _even_split(w, -(-w // step))
    return [(y, y + 1, x0, x1) for y in range(h) for x0, x1 in zip(xs, xs[1:])]


def _even_split(size: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal ranges covering [0, size)."""
    return [i * size // parts for i in range(parts + 1)]


def _backward_from_band(band: torch.Tensor, d: int, d_b: int) -> torch.Tensor:
    """B(b) = max over |δ| <= d_b of band(δ, ·, b): [(2d+1)², B, H·W] -> [B, H·W]."""
    if d_b == d:
        return band.amax(0)
    k = 2 * d + 1
    inner = torch.arange(d - d_b, d + d_b + 1, device=band.device)
    sub = (inner.view(-1, 1) * k + inner.view(1, -1)).flatten()
    return band.index_select(0, sub).amax(0)


def _forward_from_band(band: torch.Tensor, h: int, w: int, d: int, d_f: int) -> torch.Tensor:
    """F(a) = max over |δ| <= d_f of band(-δ, ·, a+δ): [(2d+1)², B, H·W] -> [B, H·W].

    Uses flat shifts: where the 2-D step a+δ wraps around a row, the entry read belongs to a
    query pixel outside the grid and is already -inf, so no extra mask is needed.
    """
    k = 2 * d + 1
    out = torch.full(band.shape[1:], float("-inf"), dtype=band.dtype, device=band.device)
    for dy in range(-d_f, d_f + 1):
        for dx in range(-d_f, d_f + 1):
            # Template pixel t = a + δ stores the query a = t - δ under offset -δ.
            plane = band[(d - dy) * k + (d - dx)]
            shift = dy * w + dx
            lo, hi = max(0, -shift), min(h * w, h * w - shift)
            if hi <= lo:  # the offset leaves the grid for every pixel (window wider than the map)
                continue
            torch.maximum(out[:, lo:hi], plane[:, lo + shift : hi + shift], out=out[:, lo:hi])
    return out
