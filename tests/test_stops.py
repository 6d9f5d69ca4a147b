"""StopStrings on its own: what is shown, what is held back, which stop matched."""

from __future__ import annotations

from ossrun.api.stops import StopStrings
from ossrun.harmony import ContentDelta, Finished, MessageEnd, ReasoningDelta


def shown(stops: StopStrings, pieces: list[str]) -> list[str]:
    return [stops.feed(piece) for piece in pieces]


def test_a_stop_split_over_pieces_is_held_back_then_cut():
    stops = StopStrings(["HOLDER"])
    assert shown(stops, ["a placeH", "OL", "DER and more"]) == ["a place", "", ""]
    assert stops.matched == "HOLDER" and stops.feed("later") == "" and stops.flush() == ""


def test_the_earliest_match_wins_and_text_after_it_in_the_same_piece_is_dropped():
    stops = StopStrings(["xyz", "b"])
    assert stops.feed("aaxyzb") == "aa" and stops.matched == "xyz"


def test_a_false_start_is_released():
    stops = StopStrings(["abc"])
    assert shown(stops, ["xab", "d", "ab"]) == ["x", "abd", ""]
    assert stops.flush() == "ab" and stops.matched is None


def test_events_hold_only_answer_text_and_flush_before_the_message_ends():
    stops = StopStrings(["END"])
    events = stops.filter([ReasoningDelta("thinking EN"), ContentDelta("answer E"), MessageEnd("final"), Finished("length")])
    assert events == [ReasoningDelta("thinking EN"), ContentDelta("answer "), ContentDelta("E"), MessageEnd("final"), Finished("length")]
    stops = StopStrings(["END"])
    assert stops.filter([ContentDelta("the END is"), MessageEnd("final"), Finished("length")]) == \
        [ContentDelta("the "), MessageEnd("final"), Finished("stop")]
