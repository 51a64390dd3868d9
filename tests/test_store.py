"""The results store: rows round-trip, every torn or duplicated shape of results.csv reads back as whole, first
copies of cells (in memory for readers, on disk for the writer), one writer per folder, schema migration and
the env.json history."""

import csv
import io
import json

import pandas as pd
import pytest

from bench.running.store import COLUMNS, DROPPED, LOCK, RunStore, StoreError, StoreLocked, read_frame


def rows(k, tag="x"):
    return [{"model": "m", "metric": f"{tag}{i}", "value": float(i)} for i in range(k)]


def lines(store):
    return store.path.read_bytes().split(b"\n")


def write(store, data: bytes):
    store.path.write_bytes(data)


def test_rows_round_trip_and_pandas_reads_them_in_one_line(tmp_path):
    with RunStore(tmp_path / "run") as store:
        store.append("a", rows(3))
        store.append("b", [{"metric": "y", "value": 1.5, "depth": 0.25, "note": "free text, with comma\nand a line"}])
    frame = pd.read_csv(store.path)
    assert list(frame.columns) == COLUMNS and len(frame) == 4
    assert '"note": "free text, with comma\\nand a line"' in frame.loc[3, "extra"]
    assert len(store.path.read_text().splitlines()) == 5  # a newline in a value never splits a row
    assert read_frame(store.dir).equals(frame)


def test_time_is_the_last_column_so_a_cut_row_is_never_taken_for_whole():
    """A row cut short loses fields or part of its stamp, never part of a measurement, only while `time` (a
    fixed format the store checks) is the last column: add new columns before it."""
    assert COLUMNS[-1] == "time"


def test_a_cell_already_stored_is_never_appended_again(tmp_path):
    with RunStore(tmp_path / "run") as store:
        assert store.append("a", rows(2))
        assert not store.append("a", rows(2, "again"))
    with RunStore(tmp_path / "run") as store:
        assert not store.append("a", rows(2, "again"))
        assert store.done_cells() == {"a"} and len(store.frame()) == 2


def test_torn_last_line_and_partial_cell_are_dropped_on_open(tmp_path):
    with RunStore(tmp_path / "run") as store:
        store.append("a", rows(2))
        store.append("b", rows(3))
    text = store.path.read_text().splitlines(keepends=True)
    # a kill mid-write: the last cell lost its final row and half of the one before
    store.path.write_text("".join(text[:-2]) + text[-2][:10])
    assert read_frame(store.dir)["cell_id"].tolist() == ["a", "a"]  # readers repair in memory
    with RunStore(tmp_path / "run") as reopened:
        assert reopened.done_cells() == {"a"}
        assert reopened.repairs.torn == 1 and reopened.repairs.partial == 1
    frame = pd.read_csv(store.path)
    assert len(frame) == 2 and frame["cell_rows"].eq(2).all()
    kept = (store.dir / DROPPED).read_bytes()
    assert text[-3].encode().rstrip(b"\n") in kept and text[-2][:10].encode() in kept  # nothing destroyed


@pytest.mark.parametrize("where", ["early", "middle", "before the stamp", "inside the stamp"])
def test_a_half_row_that_ends_in_a_newline_is_dropped_not_a_crash(tmp_path, where):
    with RunStore(tmp_path / "run") as store:
        store.append("a", rows(2))
        store.append("b", rows(2))
    raw = lines(store)  # header, a, a, b, b, ""
    last = raw[4]
    cut = {"early": 12, "middle": len(last) // 2, "before the stamp": last.rindex(b","),
           "inside the stamp": last.rindex(b"T")}[where]
    write(store, b"\n".join(raw[:4] + [last[:cut], b""]))  # b's last row cut, then a newline
    assert read_frame(store.dir)["cell_id"].tolist() == ["a", "a"]
    with RunStore(tmp_path / "run") as reopened:
        assert reopened.done_cells() == {"a"}
        assert reopened.append("b", rows(2))
    assert read_frame(store.dir)["cell_id"].tolist() == ["a", "a", "b", "b"]


@pytest.mark.parametrize("content", [b"", b"run_id,cell_id,ki", ",".join(COLUMNS).encode() + b"\r\n"])
def test_empty_or_header_only_file_is_an_empty_run(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_bytes(content)
    assert read_frame(tmp_path / "run").empty
    with RunStore(tmp_path / "run") as store:
        assert store.done_cells() == set()
        store.append("a", rows(1))
    assert pd.read_csv(store.path)["cell_id"].tolist() == ["a"]


def test_duplicate_copies_keep_the_first_complete_one(tmp_path):
    """What two writers without a lock left behind: every cell twice, consecutive or interleaved, and a partial
    copy before a whole one."""
    with RunStore(tmp_path / "run") as store:
        store.append("a", rows(2, "first"))
        store.append("b", rows(3))
        store.append("c", rows(2))
    raw = lines(store)
    a, b, c = raw[1:3], raw[3:6], raw[6:8]
    a2 = [line.replace(b"first", b"later") for line in a]
    write(store, b"\n".join([raw[0], *a, *a2, *b[:2], *c, *b, *c, *a, b""]))
    frame = read_frame(store.dir)
    assert frame["cell_id"].tolist() == ["a", "a", "c", "c", "b", "b", "b"]
    assert frame[frame["cell_id"] == "a"]["metric"].tolist() == ["first0", "first1"]
    with RunStore(tmp_path / "run") as reopened:
        assert reopened.repairs.duplicate == 3 and reopened.repairs.partial == 1
    assert pd.read_csv(store.path).equals(frame)


def test_one_writer_per_folder_the_second_is_told_who_holds_it(tmp_path):
    first = RunStore(tmp_path / "run")
    with pytest.raises(StoreLocked, match=r"written by pid \d+ on \S+ \(since .*two writers"):
        RunStore(tmp_path / "run")
    read_frame(tmp_path / "run")  # readers are never locked out
    first.close()
    assert not (tmp_path / "run" / LOCK).exists()
    with RunStore(tmp_path / "run"):
        pass


def test_a_stale_lock_file_left_by_kill_9_does_not_block(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text('{"pid": 999999, "host": "gone", "since": "then", "command": "x"}')
    with RunStore(tmp_path / "run") as store:
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] != 999999
        store.append("a", rows(1))


def older_schema_file(path, dropped=("variant", "depth")):
    header = [c for c in COLUMNS if c not in dropped]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, header)
    writer.writeheader()
    for i in range(2):
        writer.writerow({"run_id": "old", "cell_id": "old", "metric": f"m{i}", "value": i, "status": "ok",
                         "cell_rows": 2, "schema": 0, "time": "2025-01-01T00:00:00"})
    path.mkdir()
    (path / "results.csv").write_text(buf.getvalue())


def test_an_older_column_list_is_migrated_on_open_and_later_appends_align(tmp_path):
    older_schema_file(tmp_path / "run")
    before = read_frame(tmp_path / "run")
    assert list(before.columns) == COLUMNS and before["metric"].tolist() == ["m0", "m1"]
    with RunStore(tmp_path / "run") as store:
        assert store.repairs.summary() == "migrated from an older column list"
        store.append("new", [{"metric": "m", "value": 7.0, "variant": "v", "depth": 50.0, "status": "ok"}])
    frame = pd.read_csv(store.path)
    assert list(frame.columns) == COLUMNS
    assert frame["metric"].tolist() == ["m0", "m1", "m"] and frame["value"].tolist() == [0.0, 1.0, 7.0]
    assert frame["variant"].isna().tolist() == [True, True, False] and frame["depth"].iloc[2] == 50.0


def test_columns_from_a_newer_version_are_read_but_never_rewritten(tmp_path):
    with RunStore(tmp_path / "run") as store:
        store.append("a", rows(1))
    text = store.path.read_text().splitlines()
    store.path.write_text("\n".join([text[0] + ",future", text[1] + ",42", ""]))
    assert json.loads(read_frame(store.dir)["extra"].iloc[0]) == {"future": "42"}
    with pytest.raises(StoreError, match=r"columns \['future'\].*newer"):
        RunStore(tmp_path / "run")


@pytest.mark.parametrize("shape", ["not a results file", "a folder"])
def test_an_unusable_results_file_is_a_store_error(tmp_path, shape):
    (tmp_path / "run").mkdir()
    target = tmp_path / "run" / "results.csv"
    if shape == "a folder":
        target.mkdir()
    else:
        target.write_text("a,b\n1,2\n")
    with pytest.raises(StoreError):
        read_frame(tmp_path / "run")
    with pytest.raises(StoreError):
        RunStore(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK).exists()


def test_env_json_keeps_every_invocation(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "env.json").write_text(json.dumps({"command": "legacy"}))  # a run from before histories
    with RunStore(tmp_path / "run") as store:
        store.record_invocation({"command": "second", "threads": 2})
        store.record_invocation({"command": "third", "threads": 2})
        env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert [i["command"] for i in env["invocations"]] == ["legacy", "second", "third"]
    assert env["command"] == "legacy"
