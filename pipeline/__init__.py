"""The Faust pipeline (attribution, rewards, governance, ClickHouse sink) and the CLI."""
