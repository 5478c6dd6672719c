"""The OpenAI-compatible HTTP gateway in front of Kafka: `/v1/completions`,
`/v1/chat/completions` and `/v1/models`. A gateway request is an ordinary InferenceRequest on
`requests`; its answer is the committed InferenceResult on `results`, so it is attributed and
paid like any other. Streaming adds the worker's best-effort `token-deltas`."""
