"""Local infrastructure: settings, the Kafka broker runtime, ClickHouse DDL and clients."""
