import pandas as pd

from bench.store import COLUMNS, RunStore


def rows(k):
    return [{"model": "m", "metric": f"x{i}", "value": float(i)} for i in range(k)]


def test_rows_round_trip_and_pandas_reads_them_in_one_line(tmp_path):
    store = RunStore(tmp_path / "run")
    store.append("a", rows(3))
    store.append("b", [{"metric": "y", "value": 1.5, "depth": 0.25, "note": "free text, with comma"}])
    frame = pd.read_csv(store.path)
    assert list(frame.columns) == COLUMNS and len(frame) == 4
    assert store.done_cells() == {"a", "b"}
    assert '"note": "free text, with comma"' in frame.loc[3, "extra"]


def test_torn_last_line_and_partial_cell_are_dropped_on_open(tmp_path):
    store = RunStore(tmp_path / "run")
    store.append("a", rows(2))
    store.append("b", rows(3))
    text = store.path.read_text().splitlines(keepends=True)
    # simulate a kill mid-write: the last cell lost its final row and half of the one before
    store.path.write_text("".join(text[:-2]) + text[-2][:10])
    reopened = RunStore(tmp_path / "run")
    frame = reopened.frame()
    assert reopened.done_cells() == {"a"}
    assert len(frame) == 2 and frame["cell_rows"].eq(2).all()
