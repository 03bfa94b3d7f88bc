"""The worker-scaling benchmark's pure helpers (`tests.bench.workers`): CPU accounting over a
process tree, /proc parsing, paired ratios, their spread and the targets' verdicts. No
server runs here."""

from __future__ import annotations

import os

import pytest

from tests.bench import workers
from tests.bench.workers import (
    CLK_TCK,
    cpu_delta,
    judge,
    lines_for,
    machine_cpu_seconds,
    pair_order,
    paired_ratios,
    spread,
    stat_cpu_seconds,
)


def stat_line(comm: str, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...
    return (f"4242 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 {utime} {stime} 7 9 20 0 "
            "3 0 12345 1000000 500\n")


def test_stat_cpu_seconds_counts_from_the_last_parenthesis() -> None:
    assert stat_cpu_seconds(stat_line("python", 3 * CLK_TCK, CLK_TCK)) == pytest.approx(4.0)
    # a command name with spaces and parentheses does not shift the fields
    tricky = stat_line("a) b (c", CLK_TCK // 2, CLK_TCK // 2)
    assert stat_cpu_seconds(tricky) == pytest.approx(1.0)
    # children's time (cutime, cstime) is not the process's own
    assert stat_cpu_seconds(stat_line("x", 0, 0)) == 0.0


def test_stat_cpu_seconds_reads_this_process() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        assert stat_cpu_seconds(f.read()) > 0


def test_machine_cpu_seconds_splits_busy_and_stolen_time() -> None:
    t = CLK_TCK
    text = (f"cpu  {10 * t} {t} {5 * t} {1000 * t} {50 * t} {2 * t} {3 * t} {4 * t} 0 0\n"
            f"cpu0 {5 * t} 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n")
    # idle and iowait are left out, steal is apart
    assert machine_cpu_seconds(text) == pytest.approx((10 + 1 + 5 + 2 + 3, 4))
    assert machine_cpu_seconds(f"cpu  {t} 0 {t} {t}\n") == pytest.approx((2, 0))  # old kernels
    with pytest.raises(ValueError):
        machine_cpu_seconds("cpu0 1 2 3 4\n")


def test_cpu_delta_sums_the_owner_and_its_workers() -> None:
    before = {100: 10.0, 101: 3.0, 102: 4.0}
    after = {100: 10.5, 101: 5.0, 102: 5.5}
    d = cpu_delta(before, after)
    assert d.seconds == pytest.approx(0.5 + 2.0 + 1.5)
    assert d.by_pid == pytest.approx({100: 0.5, 101: 2.0, 102: 1.5})
    assert d.started == () and d.lost == ()
    assert d.as_dict(100) == {"seconds": 4.0, "owner_s": 0.5, "children_s": [2.0, 1.5]}


def test_cpu_delta_counts_a_restarted_worker_from_zero_and_reports_the_lost_one() -> None:
    before = {100: 10.0, 101: 3.0, 102: 4.0}
    after = {100: 10.2, 101: 3.5, 103: 0.7}  # worker 102 died, 103 took its place
    d = cpu_delta(before, after)
    assert d.seconds == pytest.approx(0.2 + 0.5 + 0.7)
    assert d.started == (103,) and d.lost == (102,)
    assert d.as_dict(100)["lost"] == [102] and d.as_dict(100)["started"] == [103]
    # a single process (no children) and a clock that did not move
    assert cpu_delta({7: 1.0}, {7: 1.0}).seconds == 0.0


def test_tree_cpu_reads_this_process_and_its_children() -> None:
    tree = workers.tree_cpu(os.getpid())
    assert os.getpid() in tree and tree[os.getpid()] > 0


def test_paired_ratios_leave_out_incomplete_pairs() -> None:
    assert paired_ratios([200.0, 300.0, None, 50.0], [100.0, 200.0, 10.0, 0.0]) == [2.0, 1.5]
    assert paired_ratios([], []) == []
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_spread_is_the_median_and_the_range() -> None:
    assert spread([0.9, 1.2, 0.8, 1.0, 0.95]) == {
        "median": 0.95, "min": 0.8, "max": 1.2, "runs": [0.9, 1.2, 0.8, 1.0, 0.95]}
    assert spread([1.0, 2.0])["median"] == 1.5  # an even count: the mean of the middle two
    assert spread([]) == {"median": None, "min": None, "max": None, "runs": []}
    assert spread([1234.56], 1)["runs"] == [1234.6]


def test_judge_each_target_on_its_median() -> None:
    ratios = {"bloom_negative": {"req_per_cpu_s": spread([0.9, 0.8, 0.86]),
                                 "rps": spread([1.3, 1.5, 1.45])},
              "token": {"req_per_cpu_s": spread([0.7, 0.84, 0.9])}}
    verdicts = {(v["scenario"], v["metric"]): v for v in judge(ratios)}
    assert verdicts[("bloom_negative", "req_per_cpu_s")]["passed"] is True  # 0.86 >= 0.85
    assert verdicts[("bloom_negative", "rps")]["passed"] is True  # 1.45 >= 1.4
    assert verdicts[("token", "req_per_cpu_s")]["passed"] is False  # 0.84 < 0.85
    assert verdicts[("token", "req_per_cpu_s")]["min"] == 0.7
    # not measured: neither met nor failed
    assert verdicts[("new_claims", "req_per_cpu_s")]["passed"] is None
    assert len(verdicts) == len(workers.TARGETS)
    # exactly at the minimum is met
    assert judge({"x": {"rps": spread([1.4])}}, [("x", "rps", 1.4)])[0]["passed"] is True


def test_pair_order_alternates_between_repetitions_and_scenarios() -> None:
    assert pair_order(0, 0) == (1, 2) and pair_order(1, 0) == (2, 1)
    assert pair_order(0, 1) == (2, 1) and pair_order(1, 1) == (1, 2)
    # over an even number of repetitions each server goes first equally often per scenario
    for scenario in range(len(workers.SCENARIOS)):
        firsts = [pair_order(rep, scenario)[0] for rep in range(4)]
        assert firsts.count(1) == firsts.count(2) == 2


def test_lines_for_outlasts_the_fastest_rate() -> None:
    assert lines_for(1000.0, 5, 64) == 7500 + 64 + 1
    assert lines_for(0.0, 5, 64) == 65  # before any rate is known: one a connection
    assert lines_for(-1.0, 5, 64, margin=2.0) == 65


def test_wait_quiet_gives_up_after_max_wait() -> None:
    waited, load = workers.wait_quiet([os.getpid()], limit=-1.0, max_wait=0.0, window=0.05)
    assert 0.05 <= waited < 1.0 and load >= 0.0  # one window, however quiet


def test_noise_and_quiet_pairs() -> None:
    assert workers.noise(1.0, 4.0) == 0.25 and workers.noise(1.0, 0.0) == 0.0
    assert workers.quiet_pairs([(0.1, 0.25), (0.3, 0.0), (0.0, 0.0)]) == [True, False, True]
    assert workers.quiet_pairs([(0.4, 0.4)], limit=0.5) == [True]


COLLAPSED = """\
MainThread;<module> (anon_ticket/worker.py:1);run (trio/_core/_run.py:2424);\
get_events (trio/_core/_io_epoll.py:1);EpollIOManager.get_events (trio/_core/_io_epoll.py:9) 50
MainThread;<module> (anon_ticket/worker.py:1);handle (h11/_connection.py:10) 30
MainThread;<module> (anon_ticket/worker.py:1);Link._relay (actors/link.py:100);\
Reader.token_info (anon_ticket/reads.py:50);Cursor.execute (apsw/__init__.pyi:1) 20
MainThread;<module> (anon_ticket/worker.py:1);Link._writer (actors/link.py:130);\
frame (anon_ticket/wire.py:40) 10
MainThread;<module> (anon_ticket/worker.py:1);Filter._answer (actors/filter.py:130) 10
MainThread;<module> (anon_ticket/worker.py:1);helper (contextlib.py:1) 10
not a sample line
"""


def test_layer_samples_leave_idle_out_and_know_the_worker_path() -> None:
    samples, total = workers.layer_samples(COLLAPSED)
    assert total == 80  # the 50 samples waiting in epoll are idle
    assert samples["h11 (HTTP parsing)"] == 30
    assert samples["worker's own reads (reads.py + APSW)"] == 20  # APSW under reads.py
    assert samples["link to the owner (link.py, wire.py, msgspec)"] == 10
    assert samples["filter actor (Bloom, cache)"] == 10
    assert samples["Python stdlib (contextlib, enum, ...)"] == 10


def test_us_per_request_weights_each_process_by_its_cpu() -> None:
    worker_a = (workers.Counter({"h11": 3, "link": 1}), 4, 2.0)  # 2 s of CPU
    worker_b = (workers.Counter({"h11": 1, "link": 1}), 2, 1.0)
    owner = (workers.Counter({"storage": 1}), 1, 0.5)
    empty = (workers.Counter[str](), 0, 0.3)  # no samples: nothing to split its CPU by
    us = workers.us_per_request([worker_a, worker_b, owner, empty], requests=1000)
    # h11: 3/4 x 2 s + 1/2 x 1 s = 2 s over 1000 requests = 2000 us
    assert us == {"h11": 2000.0, "link": 1000.0, "storage": 500.0}
    assert list(us) == ["h11", "link", "storage"]  # dearest first
    assert workers.us_per_request([worker_a], requests=0) == {}


def test_schedstat_and_its_delta_over_a_tree() -> None:
    assert workers.parse_schedstat("286958169 202564720 855\n") == pytest.approx(
        (0.286958169, 0.202564720, 855))
    before = {1: (0.5, 100), 2: (0.25, 40), 3: (9.0, 9)}
    after = {1: (0.75, 150), 2: (0.5, 70), 4: (0.125, 5)}  # 3 ended, 4 started
    wait, slices = workers.sched_delta(before, after)
    assert wait == pytest.approx(0.25 + 0.25 + 0.125) and slices == 50 + 30 + 5
    tree = workers.tree_sched(os.getpid())
    assert tree[os.getpid()][1] > 0


def test_longer_runs_get_more_fresh_ids_and_quick_is_the_quick_plan() -> None:
    from tests.bench import cli, nodes

    p = cli.parser("bench", "", workers.QUICK, "pair")
    longer = cli.plan_from(p.parse_args(["--pairs", "10"]), workers.QUICK, workers.FULL,
                           "unclaimed")
    assert (longer.pairs, longer.seconds) == (10, workers.FULL.seconds)
    assert longer.unclaimed == workers.FULL.unclaimed * 2  # twice the seconds of claims
    shorter = cli.plan_from(p.parse_args(["--seconds", "1"]), workers.QUICK, workers.FULL,
                            "unclaimed")
    assert shorter.unclaimed == workers.FULL.unclaimed  # never fewer than the plan's
    quick = cli.plan_from(p.parse_args(["--quick"]), nodes.QUICK, nodes.FULL, "tickets")
    assert quick == nodes.QUICK
