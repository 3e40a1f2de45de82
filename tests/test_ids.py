"""Row ids as fixed-width bytes (resume index, duplicate check) equal the ids as Python strings."""

import numpy as np
import pyarrow as pa

from worker.data.dataset import done_index, duplicates, id_bytes, is_done


def test_id_bytes_match_python_strings_for_slices_chunks_and_unicode():
    ids = ["f.parquet#0", "", "x", "ü-id-ß", "f.parquet#10000000"] * 3
    arr = pa.array(ids)
    assert [b.decode() for b in id_bytes(arr).tolist()] == ids
    assert [b.decode() for b in id_bytes(arr.slice(3, 7)).tolist()] == ids[3:10]
    chunked = pa.chunked_array([arr.slice(0, 4), arr.slice(4)])
    assert [b.decode() for b in id_bytes(chunked).tolist()] == ids
    assert id_bytes(pa.array([], pa.string())).shape == (0,)
    assert [b.decode() for b in id_bytes(pa.array([7, 8])).tolist()] == ["7", "8"]  # integer id columns


def test_resume_index_and_duplicates():
    rng = np.random.default_rng(0)
    ids = [f"part-{i}.parquet#{j}" for i in range(30) for j in rng.permutation(50)]
    index = done_index(pa.array(ids[::2]))
    mask = is_done(index, pa.array(ids))
    assert mask.tolist() == [i % 2 == 0 for i in range(len(ids))]
    assert duplicates(id_bytes(pa.array(ids))) == 0
    assert duplicates(np.concatenate([id_bytes(pa.array(ids)), id_bytes(pa.array(ids[:7]))])) == 7


def test_a_lookup_by_id_opens_only_the_row_groups_it_names(tmp_path):
    """The audit shows its worst cases' images: derived ids name their row groups; id columns are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker.data.dataset import done_index, plan_input, read_unit, units_holding

    pq.write_table(pa.table({"x": list(range(30)), "key": [f"k{i}" for i in range(30)]}), str(tmp_path / "a.parquet"),
                   row_group_size=10)
    source = plan_input(str(tmp_path), ["x"])
    fs, units = source.fs, source.units
    chosen = units_holding(units, ["a.parquet#3", "a.parquet#25"], None)
    assert [u.row_group for u in chosen] == [0, 2]
    rows = [read_unit(fs, u, ["x"], None, only=done_index(["a.parquet#3", "a.parquet#25"])) for u in chosen]
    assert [r["x"].to_pylist() for r in rows] == [[3], [25]]
    assert len(units_holding(units, ["k7"], "key")) == 3
    table = pa.concat_tables([read_unit(fs, u, ["x"], "key", only=done_index(["k7"])) for u in units])
    assert table["x"].to_pylist() == [7] and table["id"].to_pylist() == ["k7"]
