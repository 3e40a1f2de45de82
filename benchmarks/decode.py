"""Decode throughput per CPU core, full decode vs JPEG draft mode, on real photos.

    python -m benchmarks.decode [--size 224] [--rounds 5]

The photos ship with scikit-image (astronaut 512x512, coffee 400x600, chelsea 300x451); the 12-megapixel
camera size (4000x3000) is a mosaic of scikit-image's photographs and textures at their native resolution
(real high-frequency detail, nothing upscaled) and, as the worst case, uniform noise; JPEG quality 90. For each: images/s of worker.data.decode.decode_image to
size x size (stretch), one core, full decode vs ``jpeg_draft=True``, and how far the draft pixels are from
the full decode's (mean absolute difference in 0-255 levels, PSNR).  This is what sizes the CPUs of decode a
GPU needs (README, Sizing).  Writes benchmarks/results/decode.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import io
import sys

import numpy as np
from PIL import Image

from benchmarks.common import git_revision, interleaved, machine, provenance, write


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def mosaic(height: int = 3000, width: int = 4000) -> Image.Image:
    """A camera-sized image with real detail at every scale: scikit-image's photographs and textures tiled at
    their native resolution (nothing resampled), row after row."""
    from skimage import data

    tiles = [np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))
             for name in ("astronaut", "coffee", "chelsea", "rocket", "grass", "gravel", "brick", "camera")]
    canvas = np.zeros((height, width, 3), np.uint8)
    y, i = 0, 0
    while y < height:
        x, row_height = 0, 0
        while x < width:
            tile = tiles[i % len(tiles)][:height - y, :width - x]
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
            x, row_height, i = x + tile.shape[1], max(row_height, tile.shape[0]), i + 1
        y += row_height
    return Image.fromarray(canvas)


def photos() -> dict[str, bytes]:
    """Each photo at its own size, and two 12-megapixel (4000 x 3000) images with high-frequency detail: the
    mosaic of real photographs and textures, and uniform noise (JPEG's worst case)."""
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        out[f"{name} {image.width}x{image.height}"] = _jpeg(image)
    out["mosaic of photos and textures 4000x3000"] = _jpeg(mosaic())
    noise = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    out["uniform noise 4000x3000"] = _jpeg(Image.fromarray(noise))
    return out


def main(argv=None):
    from worker.data.decode import decode_image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    size = (args.size, args.size)
    rows = {}
    for label, jpeg in photos().items():
        calls = 20 if "4000" not in label else 2
        speeds = interleaved({"full": lambda j=jpeg: decode_image(j, size),
                              "draft": lambda j=jpeg: decode_image(j, size, jpeg_draft=True)},
                             args.rounds, 1, calls)
        full = decode_image(jpeg, size).astype(np.float64)
        draft = decode_image(jpeg, size, jpeg_draft=True).astype(np.float64)
        mse = ((full - draft) ** 2).mean()
        rows[label] = {"full_per_second": speeds["full"]["per_second"],
                       "draft_per_second": speeds["draft"]["per_second"],
                       "full_range": [min(speeds["full"]["all"]), max(speeds["full"]["all"])],
                       "draft_range": [min(speeds["draft"]["all"]), max(speeds["draft"]["all"])],
                       "speedup": round(speeds["draft"]["per_second"] / speeds["full"]["per_second"], 2),
                       "mean_abs_difference": round(float(np.abs(full - draft).mean()), 2),
                       "psnr_db": round(float(10 * np.log10(255 ** 2 / mse)), 1) if mse else None,
                       "jpeg_bytes": len(jpeg)}
        print(label, rows[label], flush=True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "revision": git_revision(),
               "command": "python -m benchmarks.decode " + " ".join(sys.argv[1:] if argv is None else argv),
               "size": args.size, "photos": rows}
    md = "\n".join([
        f"# Decode benchmark ({results['date']})", "",
        *provenance(results),
        f"`worker.data.decode.decode_image` of a JPEG (quality 90) to {args.size}x{args.size}, one core, images/s "
        f"(median and range over {args.rounds} interleaved rounds). Draft: `jpeg_draft=True` (`--jpeg-draft`).", "",
        "| photo | full decode | draft | speed-up | draft vs full: mean abs diff (levels) | PSNR (dB) |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {r['full_per_second']} ({r['full_range'][0]}–{r['full_range'][1]}) | {r['draft_per_second']} "
          f"({r['draft_range'][0]}–{r['draft_range'][1]}) | {r['speedup']}x | "
          f"{r['mean_abs_difference']} | {r['psnr_db'] if r['psnr_db'] is not None else 'identical'} |"
          for k, r in rows.items()], ""])
    write(results, "decode", md)
    print(md)


if __name__ == "__main__":
    main()
