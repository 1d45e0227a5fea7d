"""The replay's and the game feed's cars dealt over partitions (producer.CarPartitioner)."""

from collections import Counter

from pipeline.kafka.producer import CarPartitioner


def test_cars_are_dealt_evenly_and_the_deal_does_not_depend_on_arrival_order() -> None:
    cars = [1, 4, 10, 11, 14, 16, 18, 2, 20, 21, 22, 23, 24, 27, 3, 31, 44, 55, 63, 77]
    first = CarPartitioner("2023_Monaco_R@run-a", 4, cars)
    again = CarPartitioner("2023_Monaco_R@run-a", 4, reversed(cars))
    assert {c: first.partition(c) for c in cars} == {c: again.partition(c) for c in cars}
    assert sorted(Counter(first.partition(c) for c in cars).values()) == [5, 5, 5, 5]


def test_cars_first_seen_later_fill_the_next_partitions_and_keep_theirs() -> None:
    dealt = CarPartitioner("game-session", 4)
    seen = [dealt.partition(index) for index in range(22)]  # the game's 22 car slots
    assert sorted(Counter(seen).values()) == [5, 5, 6, 6]
    assert [dealt.partition(index) for index in range(22)] == seen  # a car keeps its partition


def test_runs_start_the_deal_at_different_partitions() -> None:
    starts = {CarPartitioner(f"run-{i}", 4).partition(0) for i in range(40)}
    assert starts == {0, 1, 2, 3}  # 22 cars on 4 do not always load partitions 0 and 1
