"""``server_caught_up`` is the barrier ``Client.flush`` is not: once it returns, another
connection's request finds the subscriptions made before it (flush let 12 of 2,000 such
requests get "no responders" on this machine; nats-py writes its PING ahead of pending SUBs)."""

from __future__ import annotations

import nats
import nats.errors
import pytest
from faststream import TestApp

from comp_common.broker import make_app, make_broker, server_caught_up
from comp_common.settings import NatsSettings


async def test_a_request_right_after_the_barrier_always_finds_the_responder(nats_url: str) -> None:
    client = await nats.connect(nats_url)
    misses = []
    try:
        for attempt in range(300):
            responder = await nats.connect(nats_url)

            async def answer(msg) -> None:
                await msg.respond(b"here")

            await responder.subscribe(f"probe.{attempt}.a", cb=answer)
            await responder.subscribe(f"probe.{attempt}.b", cb=answer)
            await server_caught_up(responder)
            for subject in (f"probe.{attempt}.a", f"probe.{attempt}.b"):
                try:
                    assert (await client.request(subject, b"", timeout=5)).data == b"here"
                except nats.errors.NoRespondersError:
                    misses.append(subject)
            await responder.close()
    finally:
        await client.close()
    assert misses == []


async def test_it_leaves_no_subscription_behind_and_works_on_an_idle_connection(nats_url: str) -> None:
    connection = await nats.connect(nats_url)
    try:
        before = len(connection._subs)
        await server_caught_up(connection)
        await server_caught_up(connection)
        assert len(connection._subs) == before
    finally:
        await connection.close()


async def test_a_closed_connection_is_an_error_not_a_hang(nats_url: str) -> None:
    connection = await nats.connect(nats_url)
    await connection.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await server_caught_up(connection)


async def test_a_service_app_answers_the_moment_its_start_returns(nats_url: str) -> None:
    client = await nats.connect(nats_url)
    misses = []
    try:
        for attempt in range(100):
            broker = make_broker(NatsSettings(url=nats_url), "caught-up-test")

            @broker.subscriber(f"ask.{attempt}")
            async def answer(body: str) -> str:
                return "here"

            async with TestApp(make_app(broker)):
                try:
                    assert (await client.request(f"ask.{attempt}", b"", timeout=5)).data == b"here"
                except nats.errors.NoRespondersError:
                    misses.append(attempt)
    finally:
        await client.close()
    assert misses == []
