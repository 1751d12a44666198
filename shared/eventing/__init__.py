"""The event path on one machine: the `eventing/` YAML carried out on a Kafka-protocol broker.

`spec` loads the YAML, `plane` runs it (sources, triggers, sinks, ingress), `broker_process` starts
an embedded Tansu broker or uses `KAFKA_BOOTSTRAP_SERVERS`. CLI: `up`, `publish`, `results`,
`invoke`, `bench-events`.
"""
