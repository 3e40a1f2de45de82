"""Small Parquet datasets of real images in each encoding the job reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.images import encode, png16, real_rgb

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def digits(n=40, size=32):
    from tests.images import digits_images

    return digits_images(size, limit=n)


def write_hf(path, images, labels, row_group=16, **extra):
    cells = [{"bytes": encode(img), "path": f"{i}.png"} for i, img in enumerate(images)]
    table = pa.table({"image": pa.array(cells, HF_IMAGE), "label": pa.array(labels, pa.int64()),
                      **{k: pa.array(v) for k, v in extra.items()}})
    pq.write_table(table, str(path), row_group_size=row_group)
    return table


def write_mixed_modes(path):
    """Real photos as plain bytes in several formats and modes, with two bad rows; returns labels."""
    photos = real_rgb()
    cells = [encode(photos[0], "JPEG"), encode(photos[1], mode="L"), encode(photos[2], mode="RGBA"),
             encode(photos[3], mode="P"), png16(photos[0]), encode(photos[1], "WEBP"), encode(photos[2], "BMP"),
             b"this is not an image", b""]
    labels = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "label": labels}), str(path))
    return cells


def write_tensor_files(directory):
    """The same photos as an Arrow fixed_shape_tensor column, nested lists and Ray's tensor type."""
    import ray

    photos = np.stack(real_rgb(size=(32, 32)))
    pq.write_table(pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(photos)}),
                   str(directory / "fixed.parquet"))
    pq.write_table(pa.table({"image": pa.array([p.tolist() for p in photos])}), str(directory / "lists.parquet"))
    ray.data.from_numpy(photos).rename_columns({"data": "image"}).repartition(1).write_parquet(
        str(directory / "ray_tensor"))
    return photos


def explain_command(model, data, out) -> list[str]:
    """``python -m jobs.explain`` as a person runs it: 4 images a batch, 8 rows a part file."""
    return [sys.executable, "-m", "jobs.explain", "--model", str(model), "--input", str(data), "--output", str(out),
            "--preprocessing", "scale01", "--batch-size", "4", "--rows-per-file", "8"]


def kill_and_resume(command, out, rows: int) -> pa.Table:
    """Run ``command`` in a Ray of its own, kill it once it has committed parts (readers then see only whole part
    files), run it again: every row once. The rows as read."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(command, cwd=root, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < pq.read_table(str(out)).num_rows < rows
    assert not any(p.name.endswith(".parquet") and not p.name.startswith("part-") for p in out.iterdir())
    rerun = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stdout
    table = pq.read_table(str(out))
    ids = table["id"].to_pylist()
    assert len(ids) == rows and len(set(ids)) == rows
    return table
