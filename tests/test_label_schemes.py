import numpy as np
import pytest

from data import label_schemes as ls


def test_names_and_ids_round_trip():
    assert ls.vertebra_name(1) == "C1"
    assert ls.vertebra_name(8) == "T1"
    assert ls.vertebra_name(19) == "T12"
    assert ls.vertebra_name(20) == "L1"
    assert ls.vertebra_name(25) == "L6"
    assert ls.vertebra_name(28) == "T13"
    for vid in ls.VERTEBRA_NAMES:
        assert ls.vertebra_id(ls.vertebra_name(vid)) == vid
    assert ls.vertebra_id("S1") == ls.SACRUM
    with pytest.raises(KeyError):
        ls.vertebra_id("X9")


def test_spine_order_puts_transitional_levels_in_place():
    assert ls.sort_spine_order([20, 28, 19, 25, 24, 26]) == [19, 28, 20, 24, 25, 26]


def test_parse_levels():
    assert ls.parse_levels("T10-L5") == [17, 18, 19, 20, 21, 22, 23, 24]
    assert ls.parse_levels("T12,L1,L2") == [19, 20, 21]
    assert ls.parse_levels("T12,T13,L1") == [19, 28, 20]
    with pytest.raises(ValueError):
        ls.parse_levels("L5-T10")


def test_neighbours_use_the_labels_present():
    assert ls.neighbours(20, [19, 20, 21]) == (19, 21)
    # T13 sits between T12 and L1
    assert ls.neighbours(19, [18, 19, 28, 20]) == (18, 28)
    assert ls.neighbours(20, [19, 28, 20, 21]) == (28, 21)
    # L6 below L5; the sacrum is never a neighbour to synthesise
    assert ls.neighbours(24, [23, 24, 25, 26]) == (23, 25)
    assert ls.neighbours(24, [23, 24, 26]) == (23, None)
    # a missing level is stepped over, ends have no neighbour
    assert ls.neighbours(20, [18, 20, 22]) == (18, 22)
    assert ls.neighbours(18, [18, 19]) == (None, 19)


def test_totalseg_ids_map_to_verse():
    ts = np.array([0, 25, 26, 27, 31, 32, 33, 43, 44, 50, 5, 92])  # 25 sacrum, 26 vertebrae_S1 (v2)
    verse = ls.to_verse(ts, "totalseg")
    assert verse.tolist() == [0, ls.SACRUM, ls.SACRUM, 24, 20, 19, 18, 8, 7, 1, 0, 0]
    assert verse.dtype == np.uint8
    with pytest.raises(KeyError, match="available"):
        ls.to_verse(ts, "nope")


def test_huge_ids_map_without_a_huge_table():
    labels = np.array([[[0, 20, 4294967295]]], dtype=np.uint32)
    assert ls.lookup_table("verse", 4294967295).size == max(ls.SCHEMES["verse"]) + 1
    assert ls.to_verse(labels, "verse").tolist() == [[[0, 20, 0]]]
    assert ls.unique_ids(labels) == [0, 20, 4294967295]


def test_unknown_ids_are_named_and_the_other_scheme_suggested():
    message, fatal = ls.unknown_ids_report([0, 19, 21, 120], "verse")
    assert not fatal and "ids 120 " in message
    # organs of a whole TotalSegmentator output are labels of that scheme, only not vertebrae
    message, fatal = ls.unknown_ids_report([0, 5, 25, 26, 27, 28, 29, 30, 31], "totalseg")
    assert not fatal and message.startswith("ids 5 are not vertebra or sacrum labels of the totalseg scheme")
    message, fatal = ls.unknown_ids_report([0, 29, 30, 31, 32], "verse")  # TotalSegmentator T12-L3
    assert fatal and "ids 29-32" in message and "--label_scheme totalseg" in message
    assert ls.unknown_ids_report([0, 20, 21], "verse") == (None, False)


def test_label_ids_in_json_must_be_whole():
    assert ls.parse_label_id(20) == 20 and ls.parse_label_id(20.0) == 20
    for bad in (20.5, True, "L1", -1, float("nan")):
        with pytest.raises(ValueError):
            ls.parse_label_id(bad)


def test_structures_not_stacked_are_no_spine():
    stacked = {20: np.array([0.0, 0.0, 100.0]), 21: np.array([0.0, 3.0, 70.0])}
    assert ls.spine_problem(stacked) is None
    side_by_side = {1: np.array([0.0, 0.0, 0.0]), 2: np.array([40.0, 0.0, 0.0])}
    assert "not stacked" in ls.spine_problem(side_by_side)
    assert "far more than any vertebra" in ls.spine_problem(stacked, {20: 600_000.0, 21: 50_000.0})
