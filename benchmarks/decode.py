"""Decode throughput per CPU core, full decode vs JPEG draft mode, on real photos.

    python -m benchmarks.decode [--size 224] [--rounds 5]

The photos ship with scikit-image (astronaut 512x512, coffee 400x600, chelsea 300x451), also upscaled to
a 12-megapixel camera size (4000x3000), JPEG quality 90. For each: images/s of worker.data.decode.decode_image to
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


def photos() -> dict[str, bytes]:
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        for label, pil in ((f"{name} {image.width}x{image.height}", image),
                           (f"{name} 4000x3000", image.resize((4000, 3000), Image.BICUBIC))):
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=90)
            out[label] = buf.getvalue()
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
        "(medians of interleaved rounds). Draft: `jpeg_draft=True` (`--jpeg-draft`).", "",
        "| photo | full decode | draft | speed-up | draft vs full: mean abs diff (levels) | PSNR (dB) |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {r['full_per_second']} | {r['draft_per_second']} | {r['speedup']}x | "
          f"{r['mean_abs_difference']} | {r['psnr_db'] if r['psnr_db'] is not None else 'identical'} |"
          for k, r in rows.items()], ""])
    write(results, "decode", md)
    print(md)


if __name__ == "__main__":
    main()
