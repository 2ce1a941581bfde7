from __future__ import annotations

import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, eventually
from tests.e2e.test_kafka import decided, kafka_source, one_run_per_record, producing
from tests.servers.kafka import KafkaBroker, create_topic, produce

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("i", range(3))
async def test_slow(i: int, kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
                    loopd_factory: Factory) -> None:
    total, before = 2000, 1500
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    config.sources = [kafka_source(kafka_broker, kafka_topic)]
    config.rules = {"bus.yaml": [one_run_per_record()]}
    daemon = loopd_factory(config)
    await daemon.start()
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": i} for i in range(before)])
    kafka_broker.stop()
    kafka_broker.start()
    async with producing(kafka_broker.bootstrap, kafka_topic, range(before, total)) as s:
        await s
    await eventually(lambda: decided(daemon) >= total, f"{total} records decided", timeout=60)
    await daemon.stop()
