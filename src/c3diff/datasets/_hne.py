"""H&E rendering: a Beer-Lambert optical-density model with haematoxylin, eosin and red-blood-cell absorbers.

Per pixel, stain amounts are composed from

- nuclei stamped per cell (shape, size, chromatin texture, membrane rim, nucleoli by type), haematoxylin;
- cytoplasm per cell from the cell-label raster (eosin and a little haematoxylin by type, granular texture),
  thin membranes at cell borders (adipocyte vacuoles are empty, ringed by a membrane);
- extracellular matrix: wavy collagen fibres in stroma (they follow the level sets of a smooth phase field),
  amorphous matrix inside nests, nothing on glass or in vessel lumens;
- red blood cells in some lumens.

The stain amounts then get a global and regional stain variation, an optical blur, and are converted to RGB through
the stain vectors, with an illumination gradient and camera noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from c3diff.datasets._celltypes import CELL_TYPES, TYPE_NAMES
from c3diff.datasets._fields import _interp_matrix, gaussian_field, grid_index, nearest_resample
from c3diff.datasets._layout import Layout, vessel_mask

#: Stain vectors (optical density per unit stain at R, G, B, unit length): haematoxylin and eosin close to Ruifrok &
#: Johnston's estimates (measured on typical nuclei and stroma of scanned slides), and a red-orange absorber for
#: erythrocytes.
STAIN_H = np.array([0.62, 0.72, 0.31])
STAIN_E = np.array([0.20, 0.88, 0.43])
STAIN_RBC = np.array([0.07, 0.75, 0.66])
_LN10 = np.float32(np.log(10.0))
_TILE = 256


def _tile(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """A periodic ``_TILE x _TILE`` texture in [0, 1] (smoothed noise, wrapped edges)."""
    t = ndi.gaussian_filter(rng.standard_normal((_TILE, _TILE)).astype(np.float32), sigma, mode="wrap")
    t = (t - t.mean()) / (t.std() + 1e-6)
    return np.clip(0.5 + t / 5.0, 0.0, 1.0).astype(np.float32)


def _fibre_tiles(rng: np.random.Generator, ps: float, size: int = 1024) -> list[np.ndarray]:
    """Four periodic collagen textures in [0, 1], with bundles along 0, 45, 90 and 135 degrees.

    Band-limited noise: long correlation along the fibre (about 7 um), a preferred spacing across it (about 8 um),
    squashed so that bundles are pink and the clefts between them pale.
    """
    spec = np.fft.rfft2(rng.standard_normal((size, size)))
    fy = np.fft.fftfreq(size)[:, None] / ps  # cycles per um
    fx = np.fft.rfftfreq(size)[None, :] / ps
    out = []
    for k in range(4):
        th = k * np.pi / 4
        f_par = fx * np.cos(th) + fy * np.sin(th)
        f_perp = -fx * np.sin(th) + fy * np.cos(th)
        filt = np.exp(-0.5 * (f_par * 2 * np.pi * 7.0) ** 2) * (
            np.exp(-0.5 * ((np.abs(f_perp) - 1 / 8.0) / 0.06) ** 2) + 0.5 * np.exp(-0.5 * (f_perp / 0.04) ** 2)
        )
        t = np.fft.irfft2(spec * filt, s=(size, size))
        t = (t - t.mean()) / (t.std() + 1e-9)
        out.append((0.5 + 0.5 * np.tanh(t + 0.6)).astype(np.float32) * 0.7 + 0.3)
    return out


def _tiled(tile: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    oy, ox = rng.integers(0, _TILE, 2)
    th, tw = tile.shape
    rolled = np.roll(tile, (-int(oy % th), -int(ox % tw)), axis=(0, 1))
    reps = (-(-shape[0] // th), -(-shape[1] // tw))
    return np.tile(rolled, reps)[: shape[0], : shape[1]]


def _blur3(a: np.ndarray) -> None:
    """In-place separable binomial blur [1, 2, 1] / 4 (optical point spread of about 0.7 px)."""
    for axis in (0, 1):
        a_ = np.moveaxis(a, axis, 0)
        tmp = a_[1:-1] * 0.5
        tmp += 0.25 * a_[:-2]
        tmp += 0.25 * a_[2:]
        a_[1:-1] = tmp


def _stamp_nuclei(rng, layout: Layout, cycling: np.ndarray, shape, ps: float, tiles: dict) -> np.ndarray:
    """Haematoxylin density of all nuclei on the H&E grid."""
    c = layout.cells
    out = np.zeros(shape, np.float32)
    flat = out.reshape(-1)
    h, w = shape
    n = c.n
    od_type = np.array([CELL_TYPES[t].nucleus_od for t in TYPE_NAMES])
    od = od_type[c.type] * np.exp(rng.normal(0, 0.08, n)) * np.where(cycling, 1.35, 1.0)
    tile_off = rng.integers(0, _TILE, (n, 2))
    n_nucleoli = np.array([CELL_TYPES[t].nucleoli for t in TYPE_NAMES])[c.type]
    nucleoli = rng.poisson(n_nucleoli)
    nl_pos = rng.uniform(-0.45, 0.45, (n, 2, 2))
    smooth = tiles["smooth"]
    for t, name in enumerate(TYPE_NAMES):
        ct = CELL_TYPES[name]
        members = np.flatnonzero(c.type == t)
        if members.size == 0:
            continue
        ext = float(np.max(c.nuc_a[members] * (1 + np.abs(c.nuc_bend[members]))) + 1.0)
        k = int(np.ceil(ext / ps))
        off = np.arange(-k, k + 1)
        win = (2 * k + 1) ** 2
        chrom_tile = tiles["coarse"] if ct.coarse else tiles["fine"]
        irregular = np.float32(0.4 if name == "Tumor" else 0.25)
        step = max(1, 3_000_000 // win)
        for start in range(0, members.size, step):
            idx = members[start : start + step]
            ny, nx = c.nuc_y[idx], c.nuc_x[idx]
            ci = np.floor(ny / ps).astype(np.int64)
            cj = np.floor(nx / ps).astype(np.int64)
            dy = ((ci[:, None] + off[None, :] + 0.5) * ps - ny[:, None]).astype(np.float32)[:, :, None]  # (m, K, 1)
            dx = ((cj[:, None] + off[None, :] + 0.5) * ps - nx[:, None]).astype(np.float32)[:, None, :]  # (m, 1, K)
            cos = np.cos(c.nuc_theta[idx]).astype(np.float32)[:, None, None]
            sin = np.sin(c.nuc_theta[idx]).astype(np.float32)[:, None, None]
            inv_a = (1.0 / c.nuc_a[idx]).astype(np.float32)[:, None, None]
            inv_b = (1.0 / c.nuc_b[idx]).astype(np.float32)[:, None, None]
            u = (dx * cos + dy * sin) * inv_a
            v = (dy * cos - dx * sin) * inv_b
            v -= c.nuc_bend[idx].astype(np.float32)[:, None, None] * (u * u - 0.35)
            rho = u * u
            rho += v * v
            # from here on, only the pixels near a nucleus (the windows are mostly empty)
            sel = rho < (1.0 / (1.0 - 0.5 * irregular)) ** 2
            cell_k, wi, wj = np.nonzero(sel)
            u, v, rho = u[sel], v[sel], np.sqrt(rho[sel])
            ii = ci[cell_k] + off[wi]
            jj = cj[cell_k] + off[wj]
            cell = idx[cell_k]
            rho *= 1.0 + irregular * (smooth[ii % _TILE, jj % _TILE] - 0.5)  # irregular nuclear outline
            b = c.nuc_b[cell].astype(np.float32)
            mask = np.clip((1.0 - rho) * (b / (0.8 * ps)) + 0.5, 0.0, 1.0)
            tex = chrom_tile[(ii + tile_off[cell, 0]) % _TILE, (jj + tile_off[cell, 1]) % _TILE]
            val = od[cell].astype(np.float32) * (1.0 + 2.0 * ct.chromatin * (tex - 0.5))
            if ct.rim_od:
                val += ct.rim_od * np.exp(-(((1.0 - rho) / 0.18) ** 2))
            if ct.nucleoli:
                a = c.nuc_a[cell].astype(np.float32)
                for q in range(2):
                    has = nucleoli[cell] > q
                    rr = ((u - nl_pos[cell, q, 0]) * a) ** 2 + ((v - nl_pos[cell, q, 1]) * b) ** 2  # um^2
                    val += np.where(has, 1.1 * np.exp(-rr / (2 * 0.45**2)), 0.0).astype(np.float32)
            val *= mask
            keep = (val > 0.02) & (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
            pix = ii[keep] * w + jj[keep]
            vals = val[keep]
            flat[pix] = np.maximum(flat[pix], vals)
    return out


def _stamp_rbcs(rng, layout: Layout, shape, ps: float) -> np.ndarray:
    """Red-blood-cell density: biconcave discs of 7-8 um scattered in part of the vessel lumens."""
    v = layout.vessels
    xs, ys = [], []
    for cy, cx, a, b, th, fill in zip(v["y"], v["x"], v["a"], v["b"], v["theta"], v["rbc_fill"], strict=True):
        ea, eb = a - 3.0, b - 3.0
        if eb <= 0:
            continue
        k = rng.poisson(fill * ea * eb / 3.6**2)
        r = np.sqrt(rng.random(k))
        phi = rng.uniform(0, 2 * np.pi, k)
        u, w_ = ea * r * np.cos(phi), eb * r * np.sin(phi)
        xs.append(cx + u * np.cos(th) - w_ * np.sin(th))
        ys.append(cy + u * np.sin(th) + w_ * np.cos(th))
    out = np.zeros(shape, np.float32)
    if not xs:
        return out
    x, y = np.concatenate(xs), np.concatenate(ys)
    rad = rng.uniform(3.4, 4.0, x.size)
    k = int(np.ceil(4.5 / ps))
    off = np.arange(-k, k + 1)
    ii = np.floor(y / ps).astype(np.int64)[:, None, None] + off[None, :, None]
    jj = np.floor(x / ps).astype(np.int64)[:, None, None] + off[None, None, :]
    dy = (ii + 0.5) * ps - y[:, None, None]
    dx = (jj + 0.5) * ps - x[:, None, None]
    rho = np.sqrt(dx * dx + dy * dy) / rad[:, None, None]
    val = np.clip((1 - rho) * 8 + 0.5, 0, 1) * (0.4 + 0.25 * rho**2)
    h, w = shape
    keep = (val > 0.02) & (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
    pix = (np.broadcast_to(ii, val.shape) * w + np.broadcast_to(jj, val.shape))[keep]
    flat = out.reshape(-1)
    flat[pix] = np.maximum(flat[pix], val[keep].astype(np.float32))
    return out


class _RowInterpolator:
    """Bilinear resampling of coarse fields onto the H&E grid, one strip of rows at a time."""

    def __init__(self, fields: dict[str, np.ndarray], spacing: float, shape: tuple[int, int], pixel_size: float):
        first = next(iter(fields.values()))
        self.ry = _interp_matrix(shape[0], pixel_size, first.shape[0], spacing)
        rx = _interp_matrix(shape[1], pixel_size, first.shape[1], spacing)
        # interpolate along x once: (h_in, W) per field
        self.cols = {
            k: np.ascontiguousarray(np.asarray(rx @ np.ascontiguousarray(f.T, np.float32)).T) for k, f in fields.items()
        }

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        return np.asarray(self.ry[r0:r1] @ self.cols[name], dtype=np.float32)


def _tile_rows(tile: np.ndarray, offset: np.ndarray, r0: int, r1: int, width: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``tile`` repeated periodically over the plane (shifted by ``offset``), ``width`` wide."""
    th, tw = tile.shape
    part = tile[(np.arange(r0, r1) + offset[0]) % th]
    part = np.roll(part, -int(offset[1] % tw), axis=1)
    return np.tile(part, (1, -(-width // tw)))[:, :width]


def _compose_rows(a0, a1, W, rows, cols, e_lab, h_lab, through_lab, low, tex, tiles, offsets, nuc, stain):
    """Haematoxylin and eosin amounts of H&E rows ``a0:a1`` (before blur)."""
    lr = rows[a0:a1]
    E = nearest_resample(e_lab[lr], np.arange(a1 - a0), cols)
    Hs = nearest_resample(h_lab[lr], np.arange(a1 - a0), cols)
    through = nearest_resample(through_lab[lr], np.arange(a1 - a0), cols)
    # collagen bundles along the local fibre direction: blend the two textures whose orientations bracket it
    # (weights ~ |cos|^4, |sin|^4 of twice the angle, sharper than cos^2 so that bundles rarely cross-hatch)
    c2, s2 = low.rows("c2", a0, a1), low.rows("s2", a0, a1)
    wc = c2 * c2
    wc *= wc
    ws = s2 * s2
    ws *= ws
    total = wc + ws + 1e-6
    fibre = np.where(c2 > 0, _tile_rows(tex[0], offsets["t0"], a0, a1, W), _tile_rows(tex[2], offsets["t2"], a0, a1, W))
    fibre *= wc / total
    fibre += (ws / total) * np.where(
        s2 > 0, _tile_rows(tex[1], offsets["t1"], a0, a1, W), _tile_rows(tex[3], offsets["t3"], a0, a1, W)
    )
    fib = low.rows("fibrous", a0, a1)
    fibre = 1.0 - fib * (1.0 - fibre)  # amorphous (1) where not fibrous
    fibre *= 0.85 + 0.3 * _tile_rows(tiles["fine"], offsets["fine"], a0, a1, W)
    ecm = low.rows("ecm", a0, a1)
    ecm *= fibre
    ecm *= through
    E += ecm
    Hs += low.rows("ecm_h", a0, a1) * through
    n = nuc[a0:a1]
    E *= 1.0 - 0.6 * np.clip(n, 0, 1)  # nuclei displace the pink cytoplasm
    Hs += n
    Hs *= stain.rows("h", a0, a1)
    E *= stain.rows("e", a0, a1)
    return Hs, E


def render_hne(
    rng: np.random.Generator,
    layout: Layout,
    labels: np.ndarray,
    label_pixel_size: float,
    pixel_size: float,
    cycling: np.ndarray,
    *,
    stain_variation: float = 1.0,
    noise: float = 2.5,
) -> np.ndarray:
    """RGB uint8 ``(3, H, W)`` H&E of the section at ``pixel_size`` um/px."""
    ps = pixel_size
    H, W = int(np.ceil(layout.height / ps)), int(np.ceil(layout.width / ps))
    c = layout.cells
    tiles = {
        "fine": _tile(rng, 0.7),
        "coarse": _tile(rng, 1.6),
        "smooth": _tile(rng, 3.0),
        "grain": _tile(rng, 1.0),
        "white": rng.standard_normal((_TILE, _TILE)).astype(np.float32),
    }

    # --- cytoplasm, membranes and where the matrix shows, on the label grid
    L = labels
    n = c.n

    def lut(values, background=0.0):
        return np.concatenate([[background], np.asarray(values, np.float32)[c.type]]).astype(np.float32)

    def attr(name):
        return [getattr(CELL_TYPES[t], name) for t in TYPE_NAMES]

    cyto_e = lut(attr("cyto_e")) * np.concatenate([[1.0], np.exp(rng.normal(0, 0.1, n))]).astype(np.float32)
    cyto_h = lut(attr("cyto_h"))
    texamp = lut(attr("cyto_texture"))
    memb = lut(attr("membrane_e"))
    through = lut(np.array(attr("ecm_through"), np.float32), background=1.0)
    grain = _tiled(tiles["grain"], L.shape, rng)
    texture = 1.0 + 2.0 * texamp[L] * (grain - 0.5)
    e_lab = cyto_e[L] * texture
    h_lab = cyto_h[L] * texture
    border = np.zeros(L.shape, bool)
    border[:, :-1] |= L[:, :-1] != L[:, 1:]
    border[:-1, :] |= L[:-1, :] != L[1:, :]
    mval = memb[L]
    mval[:, :-1] = np.maximum(mval[:, :-1], memb[L[:, 1:]])
    mval[:-1, :] = np.maximum(mval[:-1, :], memb[L[1:, :]])
    # membranes and the matrix/cell boundary follow the label grid: soften them so they do not show its staircase
    soft = 0.6 / label_pixel_size
    e_lab += ndi.gaussian_filter(np.where(border, mval, 0.0).astype(np.float32), soft) * 1.6
    lumen_lab = vessel_mask(layout.vessels, L.shape, label_pixel_size)
    through_lab = ndi.gaussian_filter((through[L] * ~lumen_lab).astype(np.float32), soft)
    # vessel walls: a continuous eosinophilic ring (basement membrane, and the media of vessels with smooth muscle)
    v = layout.vessels
    for media, amount in ((False, 0.25), (True, 0.35)):
        sub = {k: a[(v["layers"] > 0) == media] for k, a in v.items()}
        if sub["x"].size:
            outer = (
                vessel_mask(sub, L.shape, label_pixel_size, use_outer=True)
                if media
                else vessel_mask(sub, L.shape, label_pixel_size, grow=2.0)
            )
            e_lab[outer & ~lumen_lab] += amount

    rows = grid_index(H, ps, L.shape[0], label_pixel_size)
    cols = grid_index(W, ps, L.shape[1], label_pixel_size)
    del texture, grain

    # --- per-section random draws, all made before the strip loop so that the result does not depend on strips
    tex = _fibre_tiles(rng, ps)
    nuc = _stamp_nuclei(rng, layout, cycling, (H, W), ps, tiles)
    R = _stamp_rbcs(rng, layout, (H, W), ps)
    sv = stain_variation
    gshape = (int(np.ceil(layout.height / 40.0)), int(np.ceil(layout.width / 40.0)))
    fh = float(np.exp(rng.normal(0, 0.12 * sv)))
    fe = float(np.exp(rng.normal(0, 0.15 * sv)))
    stain_h = fh * np.exp(0.1 * sv * gaussian_field(rng, gshape, 40.0, 500.0))
    stain_e = fe * np.exp(0.12 * sv * gaussian_field(rng, gshape, 40.0, 400.0))
    vec_h = np.abs(STAIN_H + rng.normal(0, 0.03 * sv, 3))
    vec_e = np.abs(STAIN_E + rng.normal(0, 0.03 * sv, 3))
    vec_h /= np.linalg.norm(vec_h)
    vec_e /= np.linalg.norm(vec_e)
    ang = rng.uniform(0, 2 * np.pi)
    offsets = {k: rng.integers(0, 1 << 20, 2) for k in ("t0", "t1", "t2", "t3", "fine", "w0", "w1", "w2")}
    tint = np.array([0.0, 0.004, 0.012]) * sv  # slightly yellowish glass

    # low-frequency fields, interpolated along x once; rows are interpolated per strip
    s = layout.spacing
    low = _RowInterpolator(
        {
            "c2": layout.fibre_c2,
            "s2": layout.fibre_s2,
            "fibrous": layout.fibrous,
            "ecm": layout.ecm,
            "ecm_h": layout.ecm_h,
        },
        s,
        (H, W),
        ps,
    )
    stain = _RowInterpolator({"h": stain_h, "e": stain_e}, 40.0, (H, W), ps)
    gx = (np.cos(ang) * np.linspace(-0.5, 0.5, W, dtype=np.float32))[None, :]
    gy_all = np.sin(ang) * np.linspace(-0.5, 0.5, H, dtype=np.float32)

    rgb = np.empty((3, H, W), np.uint8)
    strip = 256
    for r0 in range(0, H, strip):
        r1 = min(H, r0 + strip)
        a0, a1 = max(0, r0 - 1), min(H, r1 + 1)  # one halo row each side for the optical blur
        Hs, E = _compose_rows(a0, a1, W, rows, cols, e_lab, h_lab, through_lab, low, tex, tiles, offsets, nuc, stain)
        for a in (Hs, E):
            _blur3(a)
        k0, k1 = r0 - a0, r0 - a0 + (r1 - r0)
        Hs, E, Rs = Hs[k0:k1], E[k0:k1], R[r0:r1]
        neutral = 0.015 + 0.02 * sv * (gy_all[r0:r1, None] + gx + 0.5)
        for ch in range(3):
            od = Hs * np.float32(vec_h[ch])
            od += E * np.float32(vec_e[ch])
            od += Rs * np.float32(STAIN_RBC[ch])
            od += neutral
            od += np.float32(tint[ch])
            od *= -_LN10
            np.exp(od, out=od)
            od *= 255.0
            if noise:
                od += np.float32(noise) * _tile_rows(tiles["white"], offsets[f"w{ch}"], r0, r1, W)
            np.clip(od, 0, 255, out=od)
            rgb[ch, r0:r1] = (od + 0.5).astype(np.uint8)
    return rgb
