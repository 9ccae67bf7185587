"""The recorder's decisions: part names, their metadata, and the ledger of what was lost."""

from __future__ import annotations

from polyfan.feed import recording
from polyfan.feed.recording import (
    Ledger,
    Lost,
    PartInfo,
    PartName,
    PublisherRestarted,
    Resumed,
    SessionState,
)


def test_names_sort_as_the_data_arrived() -> None:
    run = recording.run_stamp(1_710_513_000_123_456_789)
    assert run == "20240315T143000123456Z"
    names = [
        recording.part_name(run, 12),
        recording.compacted_name(run, 1, 11),
        recording.part_name("20240316T000000000000Z", 1),
        recording.part_name(run, 13),
    ]
    parsed = [recording.parse_name(n) for n in names]
    assert parsed[1] == PartName(run, 1, 11, True)
    assert sorted(parsed) == [parsed[1], parsed[0], parsed[3], parsed[2]]  # type: ignore[type-var]
    assert [p.name for p in parsed if p is not None] == names
    assert recording.parse_name("part-x.parquet") is None
    assert recording.is_temp_name(recording.temp_name(names[0]))
    assert recording.iso_ms(1_710_513_000_123) == "2024-03-15T14:30:00.123Z"


def test_metadata_round_trips_and_bad_metadata_is_none() -> None:
    info = PartInfo(0xDEADBEEF, True, {"AAPL": 7, "BRK.A": 2}, 40, 1_710_513_000_000, 12)
    assert recording.read_metadata(info.to_metadata()) == info
    assert recording.read_metadata({}) is None
    assert recording.read_metadata({recording.METADATA_KEY: b"{not json"}) is None
    assert recording.read_metadata({recording.METADATA_KEY: b'{"session": 1}'}) is None


def test_a_compacted_file_keeps_the_last_sessions_numbers() -> None:
    infos = [
        PartInfo(1, True, {"A": 5, "B": 2}, 10, 100, 3),
        PartInfo(2, False, {"A": 1}, 3, 50, 1),
        PartInfo(2, False, {"C": 4}, 9, 90, 2),
    ]
    merged = recording.merged(infos, ["p1", "p2", "p3"])
    assert merged == PartInfo(2, False, {"A": 1, "C": 4}, 9, 100, 6, ["p1", "p2", "p3"])


def test_resume_merges_the_newest_sessions_files_newest_first() -> None:
    newest_first = [
        PartInfo(7, True, {"A": 9}, 50, 300, 1),
        PartInfo(0, False, {}, 0, 0, 0),  # written before any session: skipped
        PartInfo(7, True, {"A": 8, "B": 3}, 40, 200, 1),
        PartInfo(6, True, {"C": 99}, 10, 100, 1),  # an older proxy session: the walk stops
        PartInfo(7, True, {"D": 1}, 1, 1, 1),
    ]
    assert recording.resume_state(newest_first) == SessionState(7, True, {"A": 9, "B": 3}, 50, 300)
    assert recording.resume_state([]) is None


def test_gaps_while_running_are_counted_per_topic() -> None:
    ledger = Ledger()
    assert ledger.control_received(5, 1, 0) == []  # heard from its start: clock still 0
    assert ledger.from_start
    assert ledger.trades_received("A", 5, 1, 100) == []
    assert ledger.trades_received("A", 5, 4, 101) == [Lost("A", 2, 4, False)]
    assert ledger.trades_received("B", 5, 3, 102) == [Lost("B", 2, 3, False)]  # from seq 1
    assert ledger.lost == 4
    info = ledger.part_written(3)
    assert info == PartInfo(5, True, {"A": 4, "B": 3}, 1, 102, 3)
    assert ledger.part_written(0).topics == {}


def test_a_late_joiner_does_not_count_what_came_before_it() -> None:
    ledger = Ledger()
    assert ledger.control_received(5, 30, 1_000) == []  # the feed clock is running already
    assert not ledger.from_start
    assert ledger.trades_received("A", 5, 17, 1_001) == []
    assert ledger.trades_received("A", 5, 18, 1_002) == []
    assert ledger.lost == 0


def test_a_new_session_is_a_proxy_restart_with_its_window() -> None:
    ledger = Ledger()
    ledger.control_received(5, 1, 0)
    ledger.trades_received("A", 5, 1, 1_000)
    assert ledger.is_new_session(6)
    assert ledger.control_received(6, 1, 0) == []  # its clock: not started yet
    assert ledger.from_start
    events = ledger.trades_received("A", 6, 1, 2_000)
    assert events == [PublisherRestarted(5, 6, 1_000, 2_000)]
    assert ledger.restarts == 1
    assert ledger.lost == 0


def test_a_resumed_recorder_names_what_went_missing_while_it_was_down() -> None:
    state = SessionState(5, True, {"A": 10, "B": 4}, 100, 5_000)
    ledger = Ledger(state)
    assert ledger.control_received(5, 131, 8_000) == [Resumed(5, 5_000, 8_000, 30)]
    assert ledger.trades_received("A", 5, 14, 8_001) == [Lost("A", 3, 14, True)]
    assert ledger.trades_received("A", 5, 16, 8_002) == [Lost("A", 1, 16, False)]  # later: live
    # a topic that first traded while the recorder was down: from seq 1 (it had the session
    # from its start)
    assert ledger.trades_received("C", 5, 3, 8_003) == [Lost("C", 2, 3, True)]
    assert ledger.lost == 6


def test_a_resumed_recorder_on_a_new_session_reports_a_proxy_restart() -> None:
    ledger = Ledger(SessionState(5, True, {"A": 10}, 100, 5_000))
    assert ledger.control_received(9, 40, 7_000) == [PublisherRestarted(5, 9, 5_000, 7_000)]
    assert not ledger.from_start
    assert ledger.trades_received("A", 9, 3, 7_001) == []  # a new session's numbers
