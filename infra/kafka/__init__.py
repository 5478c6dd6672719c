"""Kafka at the bottom of the stack: the one place Kafka clients are built, and the local
KRaft broker."""
