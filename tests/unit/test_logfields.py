"""Log lines carry the namespace, container and exec ids of the call they come from."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from ketch import logfields


def _logger(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logger = logging.getLogger(f"test.logfields.{fmt}")
    logger.handlers[:] = [logfields.handler(out, fmt)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def test_each_call_s_lines_carry_its_own_ids_and_no_other_s() -> None:
    logger, out = _logger("text")

    async def call(ns: str, cid: str, exec_id: str, go: asyncio.Event) -> None:
        logfields.bind(namespace=ns, container=cid, exec=exec_id)
        await go.wait()  # the calls interleave
        logger.info("starting %s", cid)

        async def later() -> None:
            logger.warning("exited")
        await asyncio.ensure_future(later())  # a task the call starts inherits them

    async def main() -> None:
        go = asyncio.Event()
        calls = [asyncio.ensure_future(call("ns1", "web", "", go)), asyncio.ensure_future(call("ns2", "db", "e1", go))]
        await asyncio.sleep(0)
        go.set()
        await asyncio.gather(*calls)
        logger.info("between calls")

    asyncio.run(main())
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert any(line.endswith('msg="starting web" namespace=ns1 container=web') for line in lines), lines
    assert any(line.endswith('msg="starting db" namespace=ns2 container=db exec=e1') for line in lines), lines
    assert sum(line.endswith("level=warning logger=test.logfields.text msg=exited namespace=ns1 container=web")
               for line in [line.split(" ", 1)[1] for line in lines]) == 1
    assert lines[-1].endswith('msg="between calls"')


def test_json_lines_have_the_ids_as_keys_and_extra_overrides() -> None:
    logger, out = _logger("json")

    async def main() -> None:
        logfields.bind(namespace="ns1", container="web")
        logger.error("shim of %s gone", "db", extra={"container": "db"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")

    asyncio.run(main())
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "shim of db gone" and first["namespace"] == "ns1" and first["container"] == "db"
    assert first["level"] == "error" and first["time"].endswith("Z") and "exec" not in first
    assert second["container"] == "web" and "ValueError: boom" in second["error"]


def test_text_quotes_what_would_break_the_line() -> None:
    logger, out = _logger("text")
    logger.info('two\nlines with "quotes" and a=b')
    (line,) = out.getvalue().splitlines()
    assert logfields.parse(line)["msg"] == 'two\nlines with "quotes" and a=b'


def test_parse_reads_logrus_lines_as_containerd_s_shim_writes_them() -> None:
    line = 'time="2026-12-03T06:00:00.123456789Z" level=warning msg="cleanup warnings \\"x\\"" id=web namespace=ns1'
    assert logfields.parse(line) == {"time": "2026-12-03T06:00:00.123456789Z", "level": "warning",
                                     "msg": 'cleanup warnings "x"', "id": "web", "namespace": "ns1"}
    assert logfields.parse("runc: container init failed") == {}
    assert logfields.parse("") == {}


def test_relay_keeps_a_shim_line_s_level_message_and_ids() -> None:
    logger, out = _logger("json")
    logfields.relay(logger, 'time=x level=warning logger=ketch.shim msg="init exited" namespace=ns1 container=web',
                    namespace="ns1")
    logfields.relay(logger, 'time="x" level=info msg="starting signal loop" id=db namespace=ns1', namespace="ns1")
    logfields.relay(logger, "plain text from runc", namespace="ns1")
    a, b, c = (json.loads(line) for line in out.getvalue().splitlines())
    assert (a["level"], a["msg"], a["namespace"], a["container"]) == ("warning", "init exited", "ns1", "web")
    assert (b["msg"], b["container"]) == ("starting signal loop", "db")
    assert (c["msg"], c["namespace"], "container" in c) == ("plain text from runc", "ns1", False)
