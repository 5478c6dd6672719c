from hypothesis import given
from hypothesis import strategies as st

from pipeline.attribution.ppm import apply_minimum, largest_remainder_ppm
from schemas.events import PPM_TOTAL

keys = st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(["d1", "d2"]))
shares = st.dictionaries(keys, st.floats(0, 1e6, allow_nan=False), min_size=1).filter(
    lambda d: sum(d.values()) > 0
)


@given(shares)
def test_ppm_sum_exactly_and_stay_within_one_unit_of_exact(values):
    ppm = largest_remainder_ppm(values)
    assert sum(ppm.values()) == PPM_TOTAL
    total = sum(values.values())
    for key, value in values.items():
        assert abs(ppm[key] - value * PPM_TOTAL / total) < 1.0 + 1e-6


@given(shares)
def test_ppm_does_not_depend_on_input_order(values):
    reversed_input = dict(reversed(list(values.items())))
    assert largest_remainder_ppm(values) == largest_remainder_ppm(reversed_input)


def test_three_equal_shares_give_the_extra_unit_to_the_smallest_key():
    ppm = largest_remainder_ppm({("c", "d"): 1.0, ("a", "d"): 1.0, ("b", "d"): 1.0})
    assert ppm == {("a", "d"): 333_334, ("b", "d"): 333_333, ("c", "d"): 333_333}


def test_largest_remainders_get_the_missing_units():
    # exact: 142857.14, 285714.28, 571428.57 -> floors miss one unit, which goes to .57
    ppm = largest_remainder_ppm({("a", "d"): 1.0, ("b", "d"): 2.0, ("c", "d"): 4.0})
    assert ppm == {("a", "d"): 142_857, ("b", "d"): 285_714, ("c", "d"): 571_429}


def test_zero_total_and_negative_shares_are_refused():
    import pytest

    with pytest.raises(ValueError, match="zero"):
        largest_remainder_ppm({("a", "d"): 0.0})
    with pytest.raises(ValueError, match="non-negative"):
        largest_remainder_ppm({("a", "d"): 1.0, ("b", "d"): -1.0})


def test_minimum_drops_small_keys_until_all_clear_it():
    # c is 1% (dropped at 5%); then b is 4/99 ~ 4.04% (dropped too); a remains.
    kept = apply_minimum({("a", "d"): 95.0, ("b", "d"): 4.0, ("c", "d"): 1.0}, 50_000)
    assert kept == {("a", "d"): 95.0}


def test_minimum_never_empties_the_weights():
    kept = apply_minimum({("a", "d"): 1.0, ("b", "d"): 1.0, ("c", "d"): 1.0}, 900_000)
    assert kept == {("a", "d"): 1.0}


def test_minimum_zero_keeps_every_positive_key():
    assert apply_minimum({("a", "d"): 1.0, ("b", "d"): 0.0}, 0) == {("a", "d"): 1.0}
