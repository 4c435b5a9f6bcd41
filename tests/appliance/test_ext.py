"""The deadline record of the extension section."""

from __future__ import annotations

from appliance.wire import ext
from appliance.wire.replay import Stamper, read_stamp


def test_a_deadline_record_round_trips_and_clamps() -> None:
    assert ext.budget_ms(ext.deadline_record(1234.9)) == 1234
    assert ext.budget_ms(ext.deadline_record(-5)) == 0
    assert ext.budget_ms(ext.deadline_record(1e12)) == ext.MAX_BUDGET_MS


def test_the_budget_is_read_only_from_a_leading_record() -> None:
    stamp = Stamper().next()
    assert ext.budget_ms(b"") is None
    assert ext.budget_ms(stamp) is None  # a stamp first: no deadline
    assert ext.budget_ms(b"\x02\x04\x01") is None  # cut short


def test_replacing_the_budget_keeps_the_other_records() -> None:
    stamper = Stamper()
    section = ext.deadline_record(500) + stamper.next()
    updated = ext.with_budget(section, 120.5)
    assert ext.budget_ms(updated) == 120
    assert read_stamp(updated) == read_stamp(section)  # the stamp reader skips the record
    assert len(updated) == len(section)


def test_the_encoded_record_is_found_among_others() -> None:
    section = ext.deadline_record(500) + Stamper().next() + ext.ENCODED_RECORD
    assert ext.has_record(section, ext.ENCODED_TYPE)
    assert not ext.has_record(ext.deadline_record(500) + Stamper().next(), ext.ENCODED_TYPE)
    assert not ext.has_record(b"\x01\x20\x03", ext.ENCODED_TYPE)  # cut short: a length past it
