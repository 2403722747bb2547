"""bench.run.supervisors: the supervision processes of tasks, found by kinship."""

from __future__ import annotations

from bench.run import supervisors

BENCH, DAEMON = 50, 60


def test_a_shim_per_task_each_counted() -> None:
    # 1 -> bench -> daemon; shims 100 and 200 reparented to 1; inits 101, 201 with a child 102
    parent = {BENCH: 1, DAEMON: BENCH, 100: 1, 101: 100, 102: 101, 200: 1, 201: 200}
    assert supervisors(parent, {101, 201}, set(), {BENCH, DAEMON}) == {100, 200}


def test_keeper_and_template_of_a_group_shim_counted_once() -> None:
    # keeper 300 -> shim 301 -> inits 310, 320 (310 started 311); template 302 under the keeper
    parent = {BENCH: 1, DAEMON: BENCH, 300: 1, 301: 300, 302: 300, 310: 301, 311: 310, 320: 301}
    assert supervisors(parent, {310, 320}, {301}, {BENCH, DAEMON}) == {300, 301, 302}


def test_stops_at_the_daemon_and_whoever_started_the_bench() -> None:
    # a shim left a child of the daemon (a subreaper), and a bench started under a subreaper 40
    parent = {40: 1, BENCH: 40, DAEMON: BENCH, 400: DAEMON, 401: 400, 500: 40, 501: 500}
    assert supervisors(parent, {401, 501}, set(), {40, BENCH, DAEMON}) == {400, 500}


def test_a_recorded_shim_without_tasks_under_it_is_counted() -> None:
    parent = {BENCH: 1, 600: 1, 601: 600, 700: 1}
    assert supervisors(parent, {601}, {700}, {BENCH}) == {600, 700}
