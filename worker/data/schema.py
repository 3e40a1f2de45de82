"""The one definition of the output table: columns, the map tensor type, file metadata.

Every input row becomes exactly one output row:

=================  ==================================================================
``id``             string, given or derived as ``<file relative to input>#<row>``
passed-through     the columns named with ``columns=`` (and the label column)
``predicted_class`` int32 -- argmax of the logits
``predicted_prob``  float32 -- softmax probability of the predicted class
``target_class``    int32 (list<int32> for ``top:K``); -1 for layer targets
``target_score``    float32 (list<float32> for ``top:K``): the differentiated score
``map``             ``arrow.fixed_shape_tensor`` (H, W), (K, H, W) or (H, W, C); float16 maps are
                   normalised per map (largest magnitude 1)
``map_scale``       float32 (list<float32> for ``top:K``): the true map is ``map * map_scale``
``error``           null, or why this row could not be explained (its other results are null)
statistics         float32 columns of :mod:`worker.data.stats` (of the first map for ``top:K``), and the
                   mask metrics when a mask or box column is given
=================  ==================================================================

The job's metadata (model fingerprint, method, options, coverage report,
versions) is stored as JSON under the schema metadata key ``guided_saliency``.

Examples:
    >>> import numpy as np, pyarrow as pa
    >>> col = map_column(np.ones((1, 3, 4), np.float16), valid=[True, False], shape=(3, 4))
    >>> col.type.shape, col.null_count
    ([3, 4], 1)
    >>> maps_to_numpy(col).shape
    (2, 3, 4)
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

METADATA_KEY = b"guided_saliency"
RESULT_COLUMNS = ("predicted_class", "predicted_prob", "target_class", "target_score", "map", "map_scale", "error")
IMAGE_COLUMN = "__image"  # decoded pixels between the decode and explain stages
MASK_COLUMN = "__mask"  # decoded ground-truth masks between the same stages
ERROR_COLUMN = "error"
READ_ERROR_COLUMN = "__read_error"  # why a row of the input could not be read (a broken TFRecord record)


def map_type(shape, dtype: str) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16() if dtype == "float16" else pa.float32(), list(shape))


def map_column(maps: np.ndarray, valid, shape, dtype: str | None = None) -> pa.ExtensionArray:
    """(n_valid, *shape) maps placed at the rows where ``valid`` is true; null elsewhere."""
    valid = np.asarray(valid, bool)
    dtype = dtype or ("float16" if maps.dtype == np.float16 else "float32")
    size = int(np.prod(shape))
    flat = _place(valid, np.asarray(maps).reshape(-1, size), np.float16 if dtype == "float16" else np.float32)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size, mask=pa.array(~valid))
    return pa.ExtensionArray.from_storage(map_type(shape, dtype), storage)


def read_maps(table: pa.Table) -> np.ndarray:
    """The ``map`` column of an output table at its true scale (``map * map_scale``), float32; nulls are NaN."""
    maps = maps_to_numpy(table["map"]).astype(np.float32)
    if "map_scale" in table.column_names:
        column = table["map_scale"]
        if pa.types.is_list(column.type):
            scale = np.array([v if v is not None else [np.nan] * maps.shape[1] for v in column.to_pylist()],
                             np.float32)
        else:
            scale = column.to_numpy(zero_copy_only=False).astype(np.float32)
        maps *= scale.reshape(scale.shape + (1,) * (maps.ndim - scale.ndim))
    return maps


def maps_to_numpy(column) -> np.ndarray:
    """A ``map`` column (array or chunked) as one ndarray as stored (see :func:`read_maps`); null rows are NaN."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.chunked_array([], column.type).combine_chunks()
    shape = tuple(column.type.shape)
    values = column.storage.flatten().to_numpy(zero_copy_only=False)
    out = np.full((len(column), *shape), np.nan, values.dtype)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    out[valid] = values.reshape(-1, *shape)
    return out


def result_columns(valid, explanation, errors, map_shape, map_dtype: str, k: int) -> dict[str, pa.Array]:
    """Result columns for all rows, from the Explanation of the ``valid`` ones (empty when none are)."""
    valid = np.asarray(valid, bool)
    mask, list_mask = ~valid, pa.array(~valid)
    maps = explanation.maps[:, 0] if k == 1 else explanation.maps
    pc, pp = explanation.predicted_class, explanation.predicted_prob
    tc, ts, ms = explanation.target_class, explanation.target_score, explanation.map_scale

    def per_map(values, dtype, arrow_type):
        if k == 1:
            return pa.array(_place(valid, values[:, 0], dtype), mask=mask)
        return pa.FixedSizeListArray.from_arrays(pa.array(_place(valid, values, dtype).reshape(-1)), k,
                                                 mask=list_mask).cast(pa.list_(arrow_type))

    target_class, target_score = per_map(tc, np.int32, pa.int32()), per_map(ts, np.float32, pa.float32())
    return {
        "predicted_class": pa.array(_place(valid, pc, np.int32), mask=mask),
        "predicted_prob": pa.array(_place(valid, pp, np.float32), mask=mask),
        "target_class": target_class,
        "target_score": target_score,
        "map": map_column(maps, valid, map_shape, map_dtype),
        "map_scale": per_map(ms, np.float32, pa.float32()),
        ERROR_COLUMN: pa.array(errors, pa.string()),
    }


def _place(valid: np.ndarray, values, dtype) -> np.ndarray:
    """Per-valid-row values spread over all rows (zeros where not valid)."""
    full = np.zeros((len(valid), *np.shape(values)[1:]), dtype)
    full[valid] = values
    return full


def placed_columns(valid, values: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """float32 columns for all rows from per-valid-row values; invalid rows are null."""
    valid = np.asarray(valid, bool)
    return {name: pa.array(_place(valid, column, np.float32), mask=~valid) for name, column in values.items()}


def with_metadata(schema: pa.Schema, metadata: dict) -> pa.Schema:
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def read_metadata(schema: pa.Schema) -> dict | None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None
