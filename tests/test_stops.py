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


def test_the_first_stop_to_complete_wins_however_the_text_is_split_into_tokens():
    """Before: of the matches completed within one piece the earliest start won, so ["s Pa", "France is Paris"] cut the
    answer at "France" when " Paris" was one token and at "i" when it came in pieces (hunt_engine #4)."""
    text = "The capital of France is Paris."
    for stops, expected, matched in ((["s Pa", "France is Paris"], "The capital of France i", "s Pa"),
                                     (["s Pa", "France is P"], "The capital of ", "France is P"),
                                     (["France is Paris.", "s Pa"], "The capital of France i", "s Pa")):
        for cut in range(len(text) + 1):
            for pieces in ([text[:cut], text[cut:]], ["The", " capital", " of", " France", " is", " Paris", "."], [text]):
                matcher = StopStrings(stops)
                assert "".join(shown(matcher, pieces)) == expected and matcher.matched == matched, (stops, pieces)


def test_a_false_start_is_released():
    stops = StopStrings(["abc"])
    assert shown(stops, ["xab", "d", "ab"]) == ["x", "abd", ""]
    assert stops.flush() == "ab" and stops.matched is None


def test_events_hold_only_answer_text_and_flush_when_generation_ends():
    stops = StopStrings(["END"])
    events = stops.filter([ReasoningDelta("thinking EN"), ContentDelta("answer E"), MessageEnd("final"), Finished("length")])
    assert events == [ReasoningDelta("thinking EN"), ContentDelta("answer "), MessageEnd("final"), ContentDelta("E"), Finished("length")]
    stops = StopStrings(["END"])
    assert stops.filter([ContentDelta("the END is"), MessageEnd("final"), Finished("length")]) == \
        [ContentDelta("the "), MessageEnd("final"), Finished("stop")]


def test_a_message_end_neither_shows_what_is_held_nor_restarts_the_matching():
    """The answer's messages are one text to the client (joined with "\\n"): before, a message's end flushed and reset
    the matcher, so a stop spanning two messages was returned (hunt round 21 B-F1)."""
    stops = StopStrings(["check.\nAns"])
    events = stops.filter([ContentDelta("Let me check."), MessageEnd("commentary"), ContentDelta("\nAnswer."),
                           MessageEnd("final"), Finished("stop")])
    assert events == [ContentDelta("Let me "), MessageEnd("commentary"), MessageEnd("final"), Finished("stop")]
    assert stops.matched == "check.\nAns"


def _plain_feed(state: dict, stops: list[str], text: str) -> str:
    """The matcher as it was first written (obviously right, O(held²) a piece): the reference."""
    if state["matched"] is not None:
        return ""
    text, state["held"] = state["held"] + text, ""
    found = [(text.find(stop) + len(stop), text.find(stop), stop) for stop in stops if stop in text]
    if found:  # the first to complete (its first occurrence ends first), then the earliest start
        _, at, state["matched"] = min(found)
        return text[:at]
    keep = max((k for stop in stops for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])), default=0)
    state["held"] = text[len(text) - keep:] if keep else ""
    return text[:len(text) - keep]


def test_the_incremental_matcher_equals_the_plain_search_piece_by_piece():
    """Random texts, stops and ways to cut the text into pieces: the same text shown after each piece, the same
    held-back tail and the same stop reported as the plain search."""
    import random

    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        matcher, plain = StopStrings(stops), {"held": "", "matched": None}
        for piece in pieces:
            assert matcher.feed(piece) == _plain_feed(plain, stops, piece), (stops, pieces)
            assert matcher.matched == plain["matched"], (stops, pieces)
        assert matcher.flush() == ("" if plain["matched"] else plain["held"])


def test_a_long_stop_the_text_keeps_half_matching_costs_steps_linear_in_the_text():
    """Before: each piece cost O(held²) (a slice and a compare per prefix length): a 40 KB stop string that the answer
    kept matching took the event loop for minutes over 3000 tokens. Counted in automaton steps, not in seconds."""
    matcher = StopStrings(["a" * 40_000 + "b"])
    automaton, steps = matcher._automata[0], 0
    step = automaton.step

    def counted(char: str) -> bool:
        nonlocal steps
        steps += 1
        return step(char)

    automaton.step = counted
    assert all(matcher.feed("aaaaaaaa") == "" for _ in range(3000))  # 24,000 characters, all held back
    assert steps == 24_000
    assert matcher.feed("a" * 16_000 + "b!") == "" and matcher.matched == "a" * 40_000 + "b"


def test_choices_with_the_same_stop_share_its_table():
    """Hunt round 17 A-F1: each choice (a prompt list × `n`: up to 256) built its own table for every stop string on
    the event loop; four stops of 200k characters froze the server for 137 s. The table is built once and shared."""
    stop = "ab" * 2000 + "c"
    first, second = StopStrings([stop]), StopStrings([stop])
    assert first._automata[0]._fail is second._automata[0]._fail
    assert first.feed("ab" * 2000) == "" and second.feed("x") == "x"  # the states stay each choice's own


def test_a_look_ahead_says_whether_a_stop_would_complete_and_changes_nothing():
    """What the service asks of a header's text before the parser reads it as the answer (hunt round 17 B-F2): a stop
    completing there (after the held-back tail) ends generation; the matcher's own state is left as it was."""
    stops = StopStrings(["HOLDER"])
    assert stops.feed("a placeHOL") == "a place"
    assert stops.completes_in("DER") and not stops.completes_in("DE") and not stops.completes_in("HOLDER"[3:5] + "x")
    assert stops.feed("DER and more") == "" and stops.matched == "HOLDER"
    assert not stops.completes_in("HOLDER")  # already ended
