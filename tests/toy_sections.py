"""A small hand-built section whose geometry every test can reason about exactly.

A plain module (not conftest) so test files can import it: tests/ and tests/models/ both have a conftest.py, and
``from conftest import ...`` resolves to whichever was imported first.
"""

from __future__ import annotations

import numpy as np


def make_toy_section(
    *,
    height: float = 1000.0,
    width: float = 1200.0,
    pixel_size: float = 2.0,
    origin: tuple[float, float] = (0.0, 0.0),
    n_transcripts: int = 20_000,
    seed: int = 0,
):
    """A section of ``height x width`` um: an H&E (pink ellipse of tissue on white glass) and three genes.

    ``GENE_A`` lives in the left half of the tissue, ``GENE_B`` everywhere in it, ``GENE_C`` in a small disc; spots
    are Visium-like (55 um on a 100 um hex pitch) counting exactly the transcripts in their discs.
    """
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    rng = np.random.default_rng(seed)
    oy, ox = origin
    h_px, w_px = int(round(height / pixel_size)), int(round(width / pixel_size))
    yy, xx = np.meshgrid(
        (np.arange(h_px) + 0.5) * pixel_size + oy, (np.arange(w_px) + 0.5) * pixel_size + ox, indexing="ij"
    )
    cy, cx = oy + height / 2, ox + width / 2
    ry, rx = 0.4 * height, 0.4 * width
    in_tissue = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    rgb = np.full((3, h_px, w_px), 245, dtype=np.uint8)
    rgb[0][in_tissue], rgb[1][in_tissue], rgb[2][in_tissue] = 200, 120, 170
    hne = Image2DModel.parse(
        rgb,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={
            "global": Sequence(
                [Scale([pixel_size, pixel_size], axes=("y", "x")), Translation([oy, ox], axes=("y", "x"))]
            )
        },
        scale_factors=[2, 2],
    )

    # transcripts inside the ellipse
    t = rng.uniform(0, 2 * np.pi, n_transcripts)
    r = np.sqrt(rng.uniform(0, 1, n_transcripts))
    y = cy + ry * r * np.sin(t)
    x = cx + rx * r * np.cos(t)
    gene = np.where(x < cx, rng.choice(["GENE_A", "GENE_B"], n_transcripts), "GENE_B")
    small = (y - cy) ** 2 + (x - (cx + rx / 2)) ** 2 < 80**2
    gene = np.where(small & (rng.random(n_transcripts) < 0.5), "GENE_C", gene)
    frame = pd.DataFrame({"x": x, "y": y, "gene": pd.Categorical(gene, categories=["GENE_A", "GENE_B", "GENE_C"])})
    points = PointsModel.parse(
        frame, coordinates={"x": "x", "y": "y"}, feature_key="gene", transformations={"global": Identity()}
    )

    # Visium-like spots fully inside the section
    pitch, radius = 100.0, 27.5
    centres = []
    for i, sy in enumerate(np.arange(oy + 60, oy + height - 60, pitch * np.sqrt(3) / 2)):
        for sx in np.arange(ox + 60 + (pitch / 2) * (i % 2), ox + width - 60, pitch):
            centres.append((sy, sx))
    centres = np.array(centres)
    genes = ["GENE_A", "GENE_B", "GENE_C"]
    counts = np.zeros((len(centres), 3), dtype=np.float32)
    for k, (sy, sx) in enumerate(centres):
        inside = (y - sy) ** 2 + (x - sx) ** 2 <= radius**2
        for g, name in enumerate(genes):
            counts[k, g] = np.sum(inside & (gene == name))
    in_tissue_spot = ((centres[:, 0] - cy) / ry) ** 2 + ((centres[:, 1] - cx) / rx) ** 2 <= 1
    ids = np.arange(1, len(centres) + 1)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(len(centres), radius)}, geometry=[Point(sx, sy) for sy, sx in centres], index=ids
        ),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame(
        {"spot_id": ids, "region": pd.Categorical(["spots"] * len(ids)), "in_tissue": in_tissue_spot},
        index=[f"spot{i}" for i in ids],
    )
    adata = ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = centres[:, ::-1].copy()
    adata.uns["c3diff"] = {"spots": {"layout": "visium", "diameter_um": 55.0, "pitch_um": pitch}}
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    sdata = SpatialData(
        images={"hne": hne}, points={"transcripts": points}, shapes={"spots": shapes}, tables={"table": table}
    )
    sdata.attrs["c3diff"] = {"sample_id": f"toy{seed}"}
    return sdata
