"""Kafka at the bottom of the stack: `clients` builds every Kafka client, `events` sends and
reads events, `dead_letters` turns invalid messages into dead letters, `transactions` sends
outputs and commits offsets exactly once, and `broker` runs the local KRaft broker."""
